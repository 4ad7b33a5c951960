-- 003: the context line chunks are indexed with.
--
-- Chunks are embedded and BM25-indexed with a context line (the document's title) in front of their
-- text; the chunk's own text and offsets stay those of the source. '' when a chunk has none.
ALTER TABLE chunks ADD COLUMN context text NOT NULL DEFAULT '';
