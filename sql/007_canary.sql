-- 007: gradual rollout of a version behind an alias (canary), and serving statistics per version.
--
-- An alias may name a canary version beside its live one: readers route canary_percent of their
-- requests to it (by a stable hash of the request's route key). Guards (jsonb list of
-- {metric, op, threshold}) abort the canary by themselves once canary_min_queries were measured.
-- Every alias move keeps its reason (why a canary was aborted).
ALTER TABLE aliases
    ADD COLUMN canary_version     text REFERENCES index_versions (version),
    ADD COLUMN canary_percent     double precision CHECK (canary_percent >= 0 AND canary_percent <= 100),
    ADD COLUMN canary_guards      jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN canary_min_queries integer NOT NULL DEFAULT 100 CHECK (canary_min_queries >= 1),
    ADD COLUMN canary_started_at  timestamptz;

ALTER TABLE alias_history ADD COLUMN reason text;
ALTER TABLE alias_history DROP CONSTRAINT alias_history_action_check;
ALTER TABLE alias_history ADD CONSTRAINT alias_history_action_check
    CHECK (action IN ('publish', 'swap', 'rollback', 'promote', 'shadow', 'canary', 'abort'));

-- What serving processes measured of a version, one row per process per write (summed on read):
-- queries served, queries also run on the live version and the sum of their overlap@10, and a
-- latency histogram over fixed buckets (registry.rollout_stats.LATENCY_BOUNDS_MS).
CREATE TABLE version_stats (
    id              bigint           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alias           text             NOT NULL,
    version         text             NOT NULL REFERENCES index_versions (version) ON DELETE CASCADE,
    role            text             NOT NULL CHECK (role IN ('live', 'canary', 'shadow')),
    queries         bigint           NOT NULL CHECK (queries >= 0),
    compared        bigint           NOT NULL CHECK (compared >= 0),
    overlap_sum     double precision NOT NULL,
    latency_buckets bigint[]         NOT NULL,
    recorded_at     timestamptz      NOT NULL DEFAULT now()
);

CREATE INDEX version_stats_version ON version_stats (version, role, recorded_at);
