-- 006: quality feedback on served results.
--
-- A score a user or a judge gives to a response of `ragpipe serve` (chunk_id NULL) or to one hit of
-- it, recorded with the index version that served the response, so that quality is compared version
-- by version (`ragpipe quality report`).
CREATE TABLE feedback (
    feedback_id bigint           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  text             NOT NULL,
    index_name  text             NOT NULL,
    alias       text             NOT NULL,
    version     text             NOT NULL REFERENCES index_versions (version),
    chunk_id    text,
    kind        text             NOT NULL CHECK (kind IN ('relevance', 'faithfulness', 'thumbs')),
    source      text             NOT NULL CHECK (source IN ('user', 'judge')),
    score       double precision NOT NULL CHECK (score >= -1 AND score <= 1),
    query       text,
    created_at  timestamptz      NOT NULL DEFAULT now()
);

CREATE INDEX feedback_version ON feedback (index_name, version);
