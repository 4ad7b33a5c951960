-- 002: immutable index versions behind aliases.
--
-- Every run that changes anything builds a version. Chunk rows record the version sequence number
-- that added them (added_seq) and the one that retired them (retired_seq), so the chunk set of any
-- retained version is a range query:  added_seq <= seq AND (retired_seq IS NULL OR retired_seq > seq).
-- Versions are always built on the index's head (the last version a run published), so that
-- lineage is linear even after an alias is swapped back to an older version.

CREATE TABLE index_versions (
    version        text        PRIMARY KEY,
    version_seq    bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    index_name     text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('building', 'validated', 'rejected', 'published',
                                                          'retired', 'removed')),
    parent_version text        REFERENCES index_versions (version),
    run_id         bigint,
    model_id       text        NOT NULL,
    full_build     boolean     NOT NULL DEFAULT false,
    artifact_uri   text,
    manifest       jsonb,
    metrics        jsonb       NOT NULL DEFAULT '{}',
    reason         text,                                -- why it was rejected
    created_at     timestamptz NOT NULL DEFAULT now(),
    validated_at   timestamptz,
    published_at   timestamptz,
    retired_at     timestamptz
);

CREATE INDEX index_versions_index ON index_versions (index_name, version_seq DESC);

-- The version the next incremental build starts from.
CREATE TABLE index_heads (
    index_name text        PRIMARY KEY,
    version    text        NOT NULL REFERENCES index_versions (version),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aliases (
    alias          text        PRIMARY KEY,
    index_name     text        NOT NULL,
    version        text        NOT NULL REFERENCES index_versions (version),
    shadow_version text        REFERENCES index_versions (version),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Every alias move, newest last (an audit trail: who served what, when).
CREATE TABLE alias_history (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alias      text        NOT NULL,
    version    text        NOT NULL REFERENCES index_versions (version),
    previous   text        REFERENCES index_versions (version),
    action     text        NOT NULL CHECK (action IN ('publish', 'swap', 'rollback', 'promote', 'shadow')),
    moved_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX alias_history_alias ON alias_history (alias, id DESC);

ALTER TABLE chunks
    ADD COLUMN added_seq   bigint,
    ADD COLUMN retired_seq bigint,
    ADD COLUMN valid_from  timestamptz;

ALTER TABLE chunks DROP CONSTRAINT chunks_status_check;
ALTER TABLE chunks ADD CONSTRAINT chunks_status_check
    CHECK (status IN ('pending', 'active', 'superseded', 'deleted', 'discarded'));

CREATE INDEX chunks_added_seq ON chunks (index_name, added_seq);
CREATE INDEX chunks_retired_seq ON chunks (index_name, retired_seq) WHERE retired_seq IS NOT NULL;

ALTER TABLE documents ADD COLUMN valid_from timestamptz;
-- Rows from before versions: active ones belong to every version, retired ones to none (gc drops them).
UPDATE chunks SET added_seq = 0 WHERE status = 'active';
UPDATE chunks SET added_seq = 0, retired_seq = 0 WHERE status IN ('superseded', 'deleted');
