-- 011: shadow versions beside the index's lineage, not on it.
--
-- A shadow version (built with another model or chunking and attached to an alias as its shadow)
-- is not the parent of the next regular run: its publish leaves the index head, the documents and
-- the active chunk rows as they were, so the next run is incremental over the last regular version.
-- The rows a shadow added stay with status 'shadow' (they belong to that version alone), and the
-- regular rows it does not contain are listed in shadow_excluded (they stay active for the
-- versions after it). A version's chunk set is then
--   added_seq <= seq AND (retired_seq IS NULL OR retired_seq > seq) AND status <> 'discarded'
--   AND (status <> 'shadow' OR added_seq = seq) AND no shadow_excluded row (seq, chunk_key).
-- Shadows published before this migration moved the head; they stay as they are.

ALTER TABLE chunks DROP CONSTRAINT chunks_status_check;
ALTER TABLE chunks ADD CONSTRAINT chunks_status_check
    CHECK (status IN ('pending', 'active', 'superseded', 'deleted', 'discarded', 'shadow'));

CREATE TABLE shadow_excluded (
    index_name  text   NOT NULL,
    version_seq bigint NOT NULL,
    chunk_key   bigint NOT NULL REFERENCES chunks (chunk_key) ON DELETE CASCADE,
    PRIMARY KEY (version_seq, chunk_key)
);

CREATE INDEX shadow_excluded_index ON shadow_excluded (index_name, version_seq);

-- gc finds a removed shadow's rows without reading the index's other rows.
CREATE INDEX chunks_shadow ON chunks (index_name, added_seq) WHERE status = 'shadow';
