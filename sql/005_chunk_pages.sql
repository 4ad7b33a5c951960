-- 005: the pages a chunk spans.
--
-- Chunks of documents with pages (PDF) record the first and last physical page they cover (1-based)
-- and, where the file defines page labels, the labels printed on those pages. NULL for documents
-- without pages and for chunks written before this migration.
ALTER TABLE chunks ADD COLUMN page_start integer;
ALTER TABLE chunks ADD COLUMN page_end integer;
ALTER TABLE chunks ADD COLUMN page_label_start text;
ALTER TABLE chunks ADD COLUMN page_label_end text;
