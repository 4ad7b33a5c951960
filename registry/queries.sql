-- Runtime queries of the registry, parsed once into a dict by registry.queries.
-- Each query starts with a "-- name: NAME" line. Parameters are psycopg named placeholders.

-- name: document_states
SELECT doc_id, content_hash, metadata_hash, chunker_version, status, chunk_count
FROM documents
WHERE index_name = %(index)s;

-- name: live_lease
-- A running run of another owner whose lease has not expired: the index is reserved for it.
SELECT run_id, owner, lease_until FROM runs
WHERE index_name = %(index)s AND status = 'running' AND lease_until > now() AND owner <> %(owner)s
ORDER BY run_id LIMIT 1;

-- name: insert_run
INSERT INTO runs (index_name, source, status, owner, lease_until)
VALUES (%(index)s, %(source)s, 'running', %(owner)s,
        CASE WHEN %(lease_s)s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %(lease_s)s::float8) END)
RETURNING run_id, started_at;

-- name: abandon_runs
-- Called by the holder of the index lock after checking leases: any other 'running' run of the
-- index died mid-way (or is an earlier run of the same owner, which runs one at a time).
UPDATE runs
SET status = 'failed', finished_at = now(), lease_until = NULL,
    error = 'abandoned: the process ended before finishing (found by run ' || %(run_id)s || ')'
WHERE index_name = %(index)s AND status = 'running' AND run_id <> %(run_id)s;

-- name: renew_lease
UPDATE runs SET lease_until = now() + make_interval(secs => %(lease_s)s::float8)
WHERE run_id = %(run_id)s AND status = 'running'
RETURNING index_name, state;

-- name: save_run_state
UPDATE runs SET state = %(state)s WHERE run_id = %(run_id)s;

-- name: finish_run
UPDATE runs
SET status = %(status)s, finished_at = now(), counts = %(counts)s, stage_seconds = %(stage_seconds)s,
    skipped = %(skipped)s, error = %(error)s, lease_until = NULL
WHERE run_id = %(run_id)s;

-- name: list_runs
SELECT run_id, index_name, source, owner, status, started_at, finished_at, counts, stage_seconds, error
FROM runs WHERE index_name = %(index)s ORDER BY run_id DESC LIMIT %(limit)s;

-- name: get_run
SELECT run_id, index_name, source, owner, status, started_at, finished_at, counts, stage_seconds, error, skipped
FROM runs
WHERE run_id = %(run_id)s;

-- name: missing_embeddings
SELECT h.chunk_hash
FROM unnest(%(hashes)s::text[]) AS h(chunk_hash)
WHERE NOT EXISTS (
    SELECT 1 FROM embeddings e WHERE e.model_id = %(model_id)s AND e.chunk_hash = h.chunk_hash
);

-- name: share_embedding_cache
-- Taken before looking up cache misses, in the same transaction: cache gc (lock_embedding_cache)
-- waits for lookups in flight, and a lookup after a gc sees what it deleted.
SELECT pg_advisory_xact_lock_shared(hashtextextended('ragpipe.embedding_cache', 0));

-- name: lock_embedding_cache
SELECT pg_advisory_xact_lock(hashtextextended('ragpipe.embedding_cache', 0));

-- name: collect_embeddings
-- Entries older than the minimum age that no chunk row of a retained version (building, validated,
-- published or retired; of any index) uses with the entry's model. Returns (entries, vector bytes).
WITH retained AS (
    SELECT index_name, version_seq, model_id FROM index_versions
    WHERE status IN ('building', 'validated', 'published', 'retired')
), used AS (
    SELECT r.model_id, c.chunk_hash
    FROM retained r JOIN chunks c ON c.index_name = r.index_name
    WHERE c.added_seq <= r.version_seq AND (c.retired_seq IS NULL OR c.retired_seq > r.version_seq)
      AND c.status <> 'discarded'
), gone AS (
    DELETE FROM embeddings e
    WHERE e.created_at < now() - make_interval(secs => %(min_age_s)s::float8)
      AND NOT EXISTS (SELECT 1 FROM used u WHERE u.model_id = e.model_id AND u.chunk_hash = e.chunk_hash)
    RETURNING octet_length(e.vector) AS bytes
)
SELECT count(*), coalesce(sum(bytes), 0) FROM gone;

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
    chunker_version text, chunk_count integer, valid_from timestamptz
) ON COMMIT DROP;

-- name: copy_stage_documents_versioned
COPY stage_documents (doc_id, source_uri, content_hash, metadata, metadata_hash, chunker_version, chunk_count,
                      valid_from)
FROM STDIN;

-- name: merge_documents_versioned
INSERT INTO documents AS d (index_name, doc_id, source_uri, content_hash, metadata, metadata_hash,
                            chunker_version, chunk_count, status, last_run_id, valid_from)
SELECT %(index)s, doc_id, source_uri, content_hash, metadata, metadata_hash, chunker_version, chunk_count,
       'active', %(run_id)s, valid_from
FROM stage_documents
ON CONFLICT (index_name, doc_id) DO UPDATE
SET source_uri = excluded.source_uri, content_hash = excluded.content_hash, metadata = excluded.metadata,
    metadata_hash = excluded.metadata_hash, chunker_version = excluded.chunker_version,
    chunk_count = excluded.chunk_count, status = 'active', deleted_at = NULL, updated_at = now(),
    last_run_id = excluded.last_run_id, valid_from = excluded.valid_from;

-- name: mark_documents_deleted
UPDATE documents
SET status = 'deleted', deleted_at = now(), updated_at = now(), last_run_id = %(run_id)s
WHERE index_name = %(index)s AND doc_id = ANY(%(doc_ids)s::text[]) AND status = 'active';

-- name: create_stage_chunks_versioned
CREATE TEMP TABLE stage_chunks (
    doc_id text, chunk_id text, chunk_hash text, ordinal integer, heading_path text[],
    char_start integer, char_end integer, token_count integer, text text, valid_from timestamptz,
    context text, page_start integer, page_end integer, page_label_start text, page_label_end text
) ON COMMIT DROP;

-- name: copy_stage_chunks_versioned
COPY stage_chunks (doc_id, chunk_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count, text,
                   valid_from, context, page_start, page_end, page_label_start, page_label_end)
FROM STDIN;

-- name: count_active_chunks
SELECT count(*) FROM chunks WHERE index_name = %(index)s AND status = 'active';

-- name: active_chunk_ids
SELECT chunk_id FROM chunks WHERE index_name = %(index)s AND status = 'active';

-- name: active_chunks
SELECT chunk_key, chunk_id, doc_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count, text,
       context, page_start, page_end, page_label_start, page_label_end
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

-- name: hold_merge_claim
-- A compaction writing segments no version lists yet (shared: several may merge at once).
SELECT pg_advisory_lock_shared(hashtextextended('ragpipe.merging:' || %(index)s, 0));

-- name: release_merge_claim
SELECT pg_advisory_unlock_shared(hashtextextended('ragpipe.merging:' || %(index)s, 0));

-- name: try_segment_sweep
-- Segments no version lists may be removed only while no compaction holds its claim.
SELECT pg_try_advisory_lock(hashtextextended('ragpipe.merging:' || %(index)s, 0));

-- name: end_segment_sweep
SELECT pg_advisory_unlock(hashtextextended('ragpipe.merging:' || %(index)s, 0));

-- ---------------------------------------------------------------------------------------------
-- Versions and aliases (sql/002_versions.sql)

-- name: head_version
SELECT v.version, v.version_seq, v.model_id, v.artifact_uri, v.manifest
FROM index_heads h JOIN index_versions v ON v.version = h.version
WHERE h.index_name = %(index)s;

-- name: create_version
INSERT INTO index_versions (version, index_name, status, parent_version, run_id, model_id, full_build)
VALUES (%(version)s, %(index)s, 'building', %(parent)s, %(run_id)s, %(model_id)s, %(full_build)s)
RETURNING version_seq;

-- name: unfinished_versions
-- Versions a crashed run left behind: built or validated, never published, not a shadow.
SELECT v.version, v.version_seq, v.artifact_uri
FROM index_versions v
WHERE v.index_name = %(index)s AND v.status IN ('building', 'validated')
  AND NOT EXISTS (SELECT 1 FROM aliases a WHERE a.shadow_version = v.version OR a.canary_version = v.version);

-- name: unstage_retired
UPDATE chunks SET retired_seq = NULL
WHERE index_name = %(index)s AND retired_seq = %(seq)s AND status = 'active';

-- name: unstage_added
UPDATE chunks SET status = 'discarded'
WHERE index_name = %(index)s AND added_seq = %(seq)s AND status = 'pending';

-- name: reject_version
UPDATE index_versions SET status = 'rejected', reason = %(reason)s, metrics = metrics || %(metrics)s
WHERE version = %(version)s;

-- name: stage_new_chunks
INSERT INTO chunks (index_name, doc_id, chunk_id, chunk_hash, ordinal, heading_path, char_start, char_end,
                    token_count, text, version, status, run_id, added_seq, valid_from, context,
                    page_start, page_end, page_label_start, page_label_end)
SELECT %(index)s, s.doc_id, s.chunk_id, s.chunk_hash, s.ordinal, s.heading_path, s.char_start, s.char_end,
       s.token_count, s.text, %(version)s, 'pending', %(run_id)s, %(seq)s, s.valid_from, s.context,
       s.page_start, s.page_end, s.page_label_start, s.page_label_end
FROM stage_chunks s
WHERE NOT EXISTS (
    SELECT 1 FROM chunks c WHERE c.index_name = %(index)s AND c.status = 'active' AND c.chunk_id = s.chunk_id
)
ORDER BY s.doc_id, s.ordinal;

-- name: stage_retire_replaced
-- Active chunks of re-chunked documents that the new chunking no longer produces.
UPDATE chunks c SET retired_seq = %(seq)s
WHERE c.index_name = %(index)s AND c.status = 'active' AND c.doc_id = ANY(%(doc_ids)s::text[])
  AND NOT EXISTS (SELECT 1 FROM stage_chunks s WHERE s.chunk_id = c.chunk_id);

-- name: stage_retire_deleted
UPDATE chunks SET retired_seq = %(seq)s
WHERE index_name = %(index)s AND status = 'active' AND doc_id = ANY(%(doc_ids)s::text[]);

-- name: version_changes
-- Keys a staged version adds and removes relative to its parent.
SELECT chunk_key, (added_seq = %(seq)s AND status = 'pending') AS added
FROM chunks
WHERE index_name = %(index)s
  AND ((added_seq = %(seq)s AND status = 'pending') OR (retired_seq = %(seq)s AND status = 'active'));

-- name: member_keys
SELECT chunk_key FROM chunks
WHERE index_name = %(index)s AND added_seq <= %(seq)s AND (retired_seq IS NULL OR retired_seq > %(seq)s)
  AND status <> 'discarded' AND (status <> 'shadow' OR added_seq = %(seq)s)
  AND NOT EXISTS (SELECT 1 FROM shadow_excluded x WHERE x.version_seq = %(seq)s AND x.chunk_key = chunks.chunk_key);

-- name: member_rows
SELECT chunk_key, chunk_id, doc_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count, text,
       context, page_start, page_end, page_label_start, page_label_end
FROM chunks
WHERE index_name = %(index)s AND added_seq <= %(seq)s AND (retired_seq IS NULL OR retired_seq > %(seq)s)
  AND status <> 'discarded' AND (status <> 'shadow' OR added_seq = %(seq)s)
  AND NOT EXISTS (SELECT 1 FROM shadow_excluded x WHERE x.version_seq = %(seq)s AND x.chunk_key = chunks.chunk_key)
  AND (%(all_docs)s OR doc_id = ANY(%(doc_ids)s::text[]))
ORDER BY chunk_key;

-- name: member_rows_page
-- One page of a version's chunk rows in key order, after the key the previous page ended with.
SELECT chunk_key, chunk_id, doc_id, chunk_hash, ordinal, heading_path, char_start, char_end, token_count, text,
       context, page_start, page_end, page_label_start, page_label_end
FROM chunks
WHERE index_name = %(index)s AND added_seq <= %(seq)s AND (retired_seq IS NULL OR retired_seq > %(seq)s)
  AND status <> 'discarded' AND (status <> 'shadow' OR added_seq = %(seq)s)
  AND NOT EXISTS (SELECT 1 FROM shadow_excluded x WHERE x.version_seq = %(seq)s AND x.chunk_key = chunks.chunk_key)
  AND chunk_key > %(after)s AND (%(until)s::bigint IS NULL OR chunk_key <= %(until)s)
ORDER BY chunk_key
LIMIT %(limit)s;

-- name: member_key_bounds
-- Every rows-th chunk key of a version in key order: where a full build's segments end.
SELECT chunk_key FROM (
    SELECT chunk_key, row_number() OVER (ORDER BY chunk_key) AS n FROM chunks
    WHERE index_name = %(index)s AND added_seq <= %(seq)s AND (retired_seq IS NULL OR retired_seq > %(seq)s)
      AND status <> 'discarded' AND (status <> 'shadow' OR added_seq = %(seq)s)
      AND NOT EXISTS (SELECT 1 FROM shadow_excluded x WHERE x.version_seq = %(seq)s AND x.chunk_key = chunks.chunk_key)
) members
WHERE mod(n, %(rows)s) = 0
ORDER BY chunk_key;

-- name: member_count
SELECT count(*) FROM chunks
WHERE index_name = %(index)s AND added_seq <= %(seq)s AND (retired_seq IS NULL OR retired_seq > %(seq)s)
  AND status <> 'discarded' AND (status <> 'shadow' OR added_seq = %(seq)s)
  AND NOT EXISTS (SELECT 1 FROM shadow_excluded x WHERE x.version_seq = %(seq)s AND x.chunk_key = chunks.chunk_key);

-- name: document_fields
SELECT doc_id, source_uri, metadata, valid_from FROM documents
WHERE index_name = %(index)s AND status = 'active';

-- name: mark_version_built
UPDATE index_versions SET artifact_uri = %(artifact_uri)s, manifest = %(manifest)s WHERE version = %(version)s;

-- name: mark_version_validated
UPDATE index_versions SET status = 'validated', validated_at = now(), metrics = metrics || %(metrics)s
WHERE version = %(version)s;

-- name: publish_retire_chunks
UPDATE chunks
SET status = CASE WHEN doc_id = ANY(%(deleted)s::text[]) THEN 'deleted' ELSE 'superseded' END,
    retired_run_id = %(run_id)s, retired_at = now()
WHERE index_name = %(index)s AND retired_seq = %(seq)s AND status = 'active';

-- name: publish_activate_chunks
UPDATE chunks SET status = 'active', indexed_at = now()
WHERE index_name = %(index)s AND added_seq = %(seq)s AND status = 'pending';

-- name: publish_valid_from
UPDATE chunks c SET valid_from = d.valid_from
FROM documents d
WHERE c.index_name = %(index)s AND d.index_name = c.index_name AND d.doc_id = c.doc_id AND c.status = 'active'
  AND d.doc_id = ANY(%(doc_ids)s::text[]) AND c.valid_from IS DISTINCT FROM d.valid_from;

-- name: shadow_keep_added
-- A shadow's publish: the rows it added belong to it alone (sql/011_shadow_lineage.sql).
UPDATE chunks SET status = 'shadow', indexed_at = now()
WHERE index_name = %(index)s AND added_seq = %(seq)s AND status = 'pending';

-- name: shadow_exclude_retired
-- A shadow's publish: the regular rows it does not contain, which stay active for the next versions.
INSERT INTO shadow_excluded (index_name, version_seq, chunk_key)
SELECT %(index)s, %(seq)s, chunk_key FROM chunks
WHERE index_name = %(index)s AND retired_seq = %(seq)s AND status = 'active';

-- name: set_head
INSERT INTO index_heads (index_name, version) VALUES (%(index)s, %(version)s)
ON CONFLICT (index_name) DO UPDATE SET version = excluded.version, updated_at = now();

-- name: lock_alias
SELECT alias, index_name, version, shadow_version FROM aliases WHERE alias = %(alias)s FOR UPDATE;

-- name: upsert_alias
INSERT INTO aliases (alias, index_name, version, shadow_version)
VALUES (%(alias)s, %(index)s, %(version)s, %(shadow)s)
ON CONFLICT (alias) DO UPDATE
SET version = excluded.version, shadow_version = excluded.shadow_version, updated_at = now();

-- name: record_alias_move
INSERT INTO alias_history (alias, version, previous, action, reason)
VALUES (%(alias)s, %(version)s, %(previous)s, %(action)s, %(reason)s);

-- name: set_version_status
UPDATE index_versions
SET status = %(status)s,
    published_at = CASE WHEN %(status)s = 'published' THEN coalesce(published_at, now()) ELSE published_at END,
    retired_at = CASE WHEN %(status)s = 'retired' THEN now() ELSE retired_at END
WHERE version = %(version)s;

-- name: get_version
SELECT version, version_seq, status, parent_version, model_id, full_build, artifact_uri, metrics, reason,
       created_at, published_at, index_name, run_id, manifest, validated_at, retired_at
FROM index_versions WHERE version = %(version)s;

-- name: list_versions
SELECT v.version, v.version_seq, v.status, v.parent_version, v.model_id, v.full_build, v.artifact_uri,
       v.metrics, v.reason, v.created_at, v.published_at,
       (v.manifest -> 'counts' ->> 'chunks')::bigint AS chunks,
       EXISTS (SELECT 1 FROM aliases a WHERE a.version = v.version) AS live,
       EXISTS (SELECT 1 FROM aliases a WHERE a.shadow_version = v.version) AS shadow,
       EXISTS (SELECT 1 FROM index_heads h WHERE h.version = v.version) AS head,
       EXISTS (SELECT 1 FROM aliases a WHERE a.canary_version = v.version) AS canary
FROM index_versions v
WHERE v.index_name = %(index)s
ORDER BY v.version_seq DESC;

-- name: list_aliases
SELECT a.alias, a.index_name, a.version, a.shadow_version, a.updated_at, v.model_id,
       (v.manifest -> 'counts' ->> 'chunks')::bigint AS chunks, a.canary_version, a.canary_percent
FROM aliases a JOIN index_versions v ON v.version = a.version
ORDER BY a.alias;

-- name: lock_version
SELECT version, index_name, status FROM index_versions WHERE version = %(version)s FOR UPDATE;

-- name: lock_index_aliases
SELECT alias FROM aliases WHERE index_name = %(index)s FOR UPDATE;

-- name: mark_removed
-- Only versions no alias serves; callers hold the index's alias rows locked.
UPDATE index_versions SET status = 'removed'
WHERE version = %(version)s AND status IN ('published', 'retired', 'validated', 'rejected')
  AND NOT EXISTS (SELECT 1 FROM aliases a WHERE a.version = %(version)s OR a.shadow_version = %(version)s
                                            OR a.canary_version = %(version)s)
RETURNING version;

-- name: rollback_target
-- The newest retained version older than the live one that was ever published.
SELECT version FROM index_versions
WHERE index_name = %(index)s AND version_seq < %(seq)s AND published_at IS NOT NULL
  AND status IN ('published', 'retired')
ORDER BY version_seq DESC LIMIT 1;

-- name: notify_alias
SELECT pg_notify('ragpipe_alias', %(payload)s);

-- name: listen_alias
-- The channel notify_alias sends on; registry.listener waits on it.
LISTEN ragpipe_alias;

-- name: ping
-- Is an idle connection still there? (registry.Registry checks before using one again.)
SELECT 1;

-- name: analyze_chunks
-- Fresh planner statistics for the tables a bulk load grew (autovacuum may be off, or behind):
-- without them a lookup of a few thousand cached vectors scans every vector of the model.
ANALYZE chunks, documents, embeddings;

-- name: database_size
SELECT pg_database_size(current_database());

-- name: gc_retired_rows
-- Rows no retained version can contain any more: retired at or before the oldest one kept
-- (chunks_retired_seq finds them without reading the index's other rows).
DELETE FROM chunks
WHERE index_name = %(index)s AND retired_seq <= %(min_seq)s AND status <> 'active';

-- name: gc_discarded_rows
-- Rows of versions that were never published (chunks_discarded finds them).
DELETE FROM chunks
WHERE index_name = %(index)s AND status = 'discarded';

-- name: gc_shadow_rows
-- Rows of shadow versions no longer retained (their shadow_excluded rows go with gc_shadow_excluded).
DELETE FROM chunks c
WHERE c.index_name = %(index)s AND c.status = 'shadow' AND NOT EXISTS (
    SELECT 1 FROM index_versions v
    WHERE v.version_seq = c.added_seq AND v.status IN ('building', 'validated', 'published', 'retired'));

-- name: gc_shadow_excluded
DELETE FROM shadow_excluded x
WHERE x.index_name = %(index)s AND NOT EXISTS (
    SELECT 1 FROM index_versions v
    WHERE v.version_seq = x.version_seq AND v.status IN ('building', 'validated', 'published', 'retired'));

-- name: gc_version_stats
-- Serving statistics of the index's versions that nobody serves again (removed or rejected): the
-- versions' rows stay, so the ON DELETE CASCADE of version_stats never fires. Feedback stays: it is
-- what users said, reported per version whatever became of it.
DELETE FROM version_stats s
USING index_versions v
WHERE v.version = s.version AND v.index_name = %(index)s AND v.status IN ('removed', 'rejected');

-- ---------------------------------------------------------------------------------------------
-- Gradual rollout: canaries and serving statistics (sql/007_canary.sql)

-- name: lock_canary
SELECT alias, index_name, version, canary_version, canary_percent, canary_guards, canary_min_queries,
       canary_started_at
FROM aliases WHERE alias = %(alias)s FOR UPDATE;

-- name: get_canary
SELECT alias, index_name, version, canary_version, canary_percent, canary_guards, canary_min_queries,
       canary_started_at
FROM aliases WHERE alias = %(alias)s AND canary_version IS NOT NULL;

-- name: set_canary
UPDATE aliases
SET canary_version = %(version)s, canary_percent = %(percent)s, canary_guards = %(guards)s,
    canary_min_queries = %(min_queries)s,
    canary_started_at = CASE WHEN canary_version IS DISTINCT FROM %(version)s THEN now() ELSE canary_started_at END,
    updated_at = now()
WHERE alias = %(alias)s;

-- name: clear_canary
UPDATE aliases
SET canary_version = NULL, canary_percent = NULL, canary_guards = '[]', canary_started_at = NULL, updated_at = now()
WHERE alias = %(alias)s;

-- name: clear_canary_of_version
-- An alias moved onto its canary (swap, rollback) has no canary left.
UPDATE aliases
SET canary_version = NULL, canary_percent = NULL, canary_guards = '[]', canary_started_at = NULL
WHERE alias = %(alias)s AND canary_version = %(version)s;

-- name: insert_version_stats
INSERT INTO version_stats (alias, version, role, queries, compared, overlap_sum, latency_buckets)
VALUES (%(alias)s, %(version)s, %(role)s, %(queries)s, %(compared)s, %(overlap_sum)s, %(latency_buckets)s);

-- name: version_stats_of_index
-- Every process's writes summed per version and role; the histogram is summed bucket by bucket.
SELECT s.version, s.role, sum(s.queries)::bigint AS queries, sum(s.compared)::bigint AS compared,
       sum(s.overlap_sum) AS overlap_sum,
       (SELECT array_agg(total ORDER BY i)
        FROM (SELECT b.i, sum(b.n)::bigint AS total
              FROM version_stats s2, unnest(s2.latency_buckets) WITH ORDINALITY AS b(n, i)
              WHERE s2.version = s.version AND s2.role = s.role
              GROUP BY b.i) t) AS latency_buckets
FROM version_stats s JOIN index_versions v ON v.version = s.version
WHERE v.index_name = %(index)s
GROUP BY s.version, s.role;

-- name: canary_stats
-- The canary's statistics since it started (an earlier canary of the same version does not count).
SELECT s.version, s.role, coalesce(sum(s.queries), 0)::bigint AS queries,
       coalesce(sum(s.compared), 0)::bigint AS compared, coalesce(sum(s.overlap_sum), 0) AS overlap_sum,
       (SELECT array_agg(total ORDER BY i)
        FROM (SELECT b.i, sum(b.n)::bigint AS total
              FROM version_stats s2, unnest(s2.latency_buckets) WITH ORDINALITY AS b(n, i)
              WHERE s2.alias = %(alias)s AND s2.version = %(version)s AND s2.role = 'canary'
                AND s2.recorded_at >= %(since)s
              GROUP BY b.i) t) AS latency_buckets
FROM version_stats s
WHERE s.alias = %(alias)s AND s.version = %(version)s AND s.role = 'canary' AND s.recorded_at >= %(since)s
GROUP BY s.version, s.role;

-- name: alias_history
SELECT version, previous, action, reason, moved_at FROM alias_history
WHERE alias = %(alias)s ORDER BY id DESC LIMIT %(limit)s;

-- name: source_objects
SELECT doc_id, etag, size, mtime, fingerprint, content_hash, skip_reason, skip_gone
FROM source_objects
WHERE index_name = %(index)s AND source = %(source)s;

-- name: create_stage_source_objects
CREATE TEMP TABLE stage_source_objects (
    doc_id text, etag text, size bigint, mtime timestamptz, fingerprint text, content_hash text,
    skip_reason text, skip_gone boolean
) ON COMMIT DROP;

-- name: copy_stage_source_objects
COPY stage_source_objects (doc_id, etag, size, mtime, fingerprint, content_hash, skip_reason, skip_gone) FROM STDIN;

-- name: merge_source_objects
INSERT INTO source_objects (index_name, source, doc_id, etag, size, mtime, fingerprint, content_hash, skip_reason,
                            skip_gone)
SELECT %(index)s, %(source)s, doc_id, etag, size, mtime, fingerprint, content_hash, skip_reason, skip_gone
FROM stage_source_objects
ON CONFLICT (index_name, source, doc_id) DO UPDATE
SET etag = excluded.etag, size = excluded.size, mtime = excluded.mtime, fingerprint = excluded.fingerprint,
    content_hash = excluded.content_hash, skip_reason = excluded.skip_reason, skip_gone = excluded.skip_gone,
    recorded_at = now();

-- name: forget_source_objects
DELETE FROM source_objects
WHERE index_name = %(index)s AND source = %(source)s AND doc_id = ANY(%(doc_ids)s::text[]);

-- name: insert_feedback
INSERT INTO feedback (request_id, index_name, alias, version, chunk_id, kind, source, score, query)
VALUES (%(request_id)s, %(index_name)s, %(alias)s, %(version)s, %(chunk_id)s, %(kind)s, %(source)s, %(score)s,
        %(query)s)
RETURNING feedback_id;

-- name: quality_report
-- Feedback per version (newest version first), then kind and source: how many scores, their mean.
SELECT f.index_name, f.version, v.status, f.kind, f.source, count(*) AS count, avg(f.score) AS mean,
       min(f.created_at) AS first_at, max(f.created_at) AS last_at
FROM feedback f
JOIN index_versions v ON v.version = f.version
WHERE %(index)s::text IS NULL OR f.index_name = %(index)s::text
GROUP BY f.index_name, f.version, v.version_seq, v.status, f.kind, f.source
ORDER BY f.index_name, v.version_seq DESC, f.kind, f.source;
