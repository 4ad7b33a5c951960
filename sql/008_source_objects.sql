-- 008: what an object-store source listed when its objects were last read.
--
-- One row per object (key relative to the source's prefix, the document's doc_id) of a source
-- URI indexed into an index, written once the run that read it succeeded. A later listing that
-- shows the same ETag, size and modification time, read under the same chunker and extractor
-- configuration (fingerprint), is not read again. content_hash is the document the object became;
-- skip_reason, when its content cannot be indexed, why (skip_gone: the document is deleted).
-- No credentials are stored: source is the URI as given, which may not hold any.
CREATE TABLE source_objects (
    index_name   text        NOT NULL,
    source       text        NOT NULL,
    doc_id       text        NOT NULL,
    etag         text,                               -- NULL where the store lists none (file://)
    size         bigint      NOT NULL,
    mtime        timestamptz,
    fingerprint  text        NOT NULL,
    content_hash text,
    skip_reason  text,
    skip_gone    boolean     NOT NULL DEFAULT false,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (index_name, source, doc_id),
    CHECK ((content_hash IS NULL) <> (skip_reason IS NULL))
);
