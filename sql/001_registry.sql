-- 001: the doc-chunk registry, the embedding cache and the run log.
--
-- Every table is scoped by index_name so that several indexes share one database.

CREATE TABLE documents (
    index_name      text        NOT NULL,
    doc_id          text        NOT NULL,
    source_uri      text        NOT NULL,
    content_hash    text        NOT NULL,               -- sha256 hex of the normalized text
    metadata        jsonb       NOT NULL DEFAULT '{}',
    metadata_hash   text        NOT NULL,               -- sha256 hex of canonical JSON (metadata, source_uri)
    chunker_version text        NOT NULL,               -- chunks were cut by this chunker configuration
    chunk_count     integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('active', 'deleted')),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    last_run_id     bigint,
    PRIMARY KEY (index_name, doc_id)
);

-- One row per chunk placement. Rows are never rewritten in place: a changed document gets new rows
-- and its old rows become 'superseded'; a deleted document's rows become 'deleted'. chunk_key is the
-- integer label the vector index stores, so attribution is a primary-key lookup.
CREATE TABLE chunks (
    chunk_key       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    index_name      text        NOT NULL,
    doc_id          text        NOT NULL,
    chunk_id        text        NOT NULL,               -- sha256 hex over doc_id, position, headings and text
    chunk_hash      text        NOT NULL,               -- sha256 hex of the chunk text (embedding cache key)
    ordinal         integer     NOT NULL,
    heading_path    text[]      NOT NULL,
    char_start      integer     NOT NULL,
    char_end        integer     NOT NULL,
    token_count     integer     NOT NULL,
    text            text        NOT NULL,
    version         text        NOT NULL,               -- index version the row was added in
    status          text        NOT NULL CHECK (status IN ('active', 'superseded', 'deleted')),
    run_id          bigint      NOT NULL,               -- run that created the row
    retired_run_id  bigint,                             -- run that superseded or deleted it
    indexed_at      timestamptz NOT NULL DEFAULT now(),
    retired_at      timestamptz,
    CHECK (char_start >= 0 AND char_end > char_start)
);

CREATE UNIQUE INDEX chunks_active_chunk_id ON chunks (index_name, chunk_id) WHERE status = 'active';
CREATE INDEX chunks_active_doc ON chunks (index_name, doc_id) WHERE status = 'active';

-- Content-addressed embedding cache: one vector per (model, chunk text). Offsets and headings are not
-- part of the key, so moving text costs no embedding.
CREATE TABLE embeddings (
    model_id    text        NOT NULL,
    chunk_hash  text        NOT NULL,
    dim         integer     NOT NULL,
    vector      bytea       NOT NULL,                   -- float32 little-endian, L2-normalized
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, chunk_hash),
    CHECK (octet_length(vector) = 4 * dim)
);

CREATE TABLE runs (
    run_id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    index_name    text        NOT NULL,
    source        text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    counts        jsonb       NOT NULL DEFAULT '{}',
    stage_seconds jsonb       NOT NULL DEFAULT '{}',
    skipped       jsonb       NOT NULL DEFAULT '[]',    -- [{"doc_id", "reason"}]
    error         text
);

CREATE INDEX runs_index_started ON runs (index_name, started_at DESC);
