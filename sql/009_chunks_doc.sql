-- 009: chunk rows by document, whatever their status.
--
-- A version's rows of a few documents (what an incremental build and an upsert rewrite) include
-- rows still pending, which the partial index on active rows does not cover: without this index
-- that lookup reads every row of the index.
CREATE INDEX chunks_doc ON chunks (index_name, doc_id);
