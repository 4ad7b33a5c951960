-- Runtime queries of the registry, parsed once into a dict by registry.queries.
-- Each query starts with a "-- name: NAME" line. Parameters are psycopg named placeholders.

-- name: document_states
SELECT doc_id, content_hash, metadata_hash, chunker_version, status, chunk_count
FROM documents
WHERE index_name = %(index)s;

-- name: insert_run
INSERT INTO runs (index_name, source, status)
VALUES (%(index)s, %(source)s, 'running')
RETURNING run_id, started_at;

-- name: abandon_runs
-- Called by the holder of the index lock: any other 'running' run of the index died mid-way.
UPDATE runs
SET status = 'failed', finished_at = now(),
    error = 'abandoned: the process ended before finishing (found by run ' || %(run_id)s || ')'
WHERE index_name = %(index)s AND status = 'running' AND run_id <> %(run_id)s;

-- name: finish_run
UPDATE runs
SET status = %(status)s, finished_at = now(), counts = %(counts)s, stage_seconds = %(stage_seconds)s,
    skipped = %(skipped)s, error = %(error)s
WHERE run_id = %(run_id)s;

-- name: get_run
SELECT run_id, index_name, source, status, started_at, finished_at, counts, stage_seconds, skipped, error
FROM runs
WHERE run_id = %(run_id)s;

-- name: missing_embeddings
SELECT h.chunk_hash
FROM unnest(%(hashes)s::text[]) AS h(chunk_hash)
WHERE NOT EXISTS (
    SELECT 1 FROM embeddings e WHERE e.model_id = %(model_id)s AND e.chunk_hash = h.chunk_hash
);

-- name: create_stage_embeddings
CREATE TEMP TABLE stage_embeddings (chunk_hash text, dim integer, vector bytea) ON COMMIT DROP;

-- name: copy_stage_embeddings
COPY stage_embeddings (chunk_hash, dim, vector) FROM STDIN;

-- name: merge_embeddings
INSERT INTO embeddings (model_id, chunk_hash, dim, vector)
SELECT %(model_id)s, chunk_hash, dim, vector FROM stage_embeddings
ON CONFLICT (model_id, chunk_hash) DO NOTHING;

-- name: fetch_embeddings
SELECT chunk_hash, vector
FROM embeddings
WHERE model_id = %(model_id)s AND chunk_hash = ANY(%(hashes)s::text[]);

-- name: create_stage_documents
CREATE TEMP TABLE stage_documents (
    doc_id text, source_uri text, content_hash text, metadata jsonb, metadata_hash text,
    chunker_version text, chunk_count integer
) ON COMMIT DROP;

-- name: copy_stage_documents
COPY stage_documents (doc_id, source_uri, content_hash, metadata, metadata_hash, chunker_version, chunk_count)
FROM STDIN;

-- name: merge_documents
INSERT INTO documents AS d (index_name, doc_id, source_uri, content_hash, metadata, metadata_hash,
                            chunker_version, chunk_count, status, last_run_id)
SELECT %(index)s, doc_id, source_uri, content_hash, metadata, metadata_hash, chunker_version, chunk_count,
       'active', %(run_id)s
FROM stage_documents
ON CONFLICT (index_name, doc_id) DO UPDATE
SET source_uri = excluded.source_uri, content_hash = excluded.content_hash, metadata = excluded.metadata,
    metadata_hash = excluded.metadata_hash, chunker_version = excluded.chunker_version,
    chunk_count = excluded.chunk_count, status = 'active', deleted_at = NULL, updated_at = now(),
    last_run_id = excluded.last_run_id;

-- name: mark_documents_deleted
UPDATE documents
SET status = 'deleted', deleted_at = now(), updated_at = now(), last_run_id = %(run_id)s
WHERE index_name = %(index)s AND doc_id = ANY(%(doc_ids)s::text[]) AND status = 'active';

-- name: mark_chunks_deleted
UPDATE chunks
SET status = 'deleted', retired_run_id = %(run_id)s, retired_at = now()
WHERE index_name = %(index)s AND status = 'active' AND doc_id = ANY(%(doc_ids)s::text[]);

-- name: create_stage_chunks
CREATE TEMP TABLE stage_chunks (
    doc_id text, chunk_id text, chunk_hash text, ordinal integer, heading_path text[],
    char_start integer, char_end integer, token_count integer, text text
) ON COMMIT DROP;

-- name: copy_stage_chunks
COPY stage_chunks (doc_id, chunk_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count, text)
FROM STDIN;

-- name: supersede_chunks
-- Active chunks of re-chunked documents that the new chunking no longer produces.
UPDATE chunks c
SET status = 'superseded', retired_run_id = %(run_id)s, retired_at = now()
WHERE c.index_name = %(index)s AND c.status = 'active' AND c.doc_id = ANY(%(doc_ids)s::text[])
  AND NOT EXISTS (SELECT 1 FROM stage_chunks s WHERE s.chunk_id = c.chunk_id);

-- name: insert_new_chunks
INSERT INTO chunks (index_name, doc_id, chunk_id, chunk_hash, ordinal, heading_path, char_start, char_end,
                    token_count, text, version, status, run_id)
SELECT %(index)s, s.doc_id, s.chunk_id, s.chunk_hash, s.ordinal, s.heading_path, s.char_start, s.char_end,
       s.token_count, s.text, %(version)s, 'active', %(run_id)s
FROM stage_chunks s
WHERE NOT EXISTS (
    SELECT 1 FROM chunks c WHERE c.index_name = %(index)s AND c.status = 'active' AND c.chunk_id = s.chunk_id
)
ORDER BY s.doc_id, s.ordinal;

-- name: count_active_chunks
SELECT count(*) FROM chunks WHERE index_name = %(index)s AND status = 'active';

-- name: active_chunk_ids
SELECT chunk_id FROM chunks WHERE index_name = %(index)s AND status = 'active';

-- name: active_chunks
SELECT chunk_key, doc_id, chunk_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count,
       text, version
FROM chunks
WHERE index_name = %(index)s AND status = 'active'
ORDER BY doc_id, ordinal;

-- name: active_chunks_of_deleted_documents
SELECT count(*)
FROM chunks c JOIN documents d ON d.index_name = c.index_name AND d.doc_id = c.doc_id
WHERE c.index_name = %(index)s AND c.status = 'active' AND d.status = 'deleted';

-- name: try_index_lock
SELECT pg_try_advisory_lock(hashtextextended('ragpipe.index:' || %(index)s, 0));

-- name: release_index_lock
SELECT pg_advisory_unlock(hashtextextended('ragpipe.index:' || %(index)s, 0));
