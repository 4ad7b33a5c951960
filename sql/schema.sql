-- The current schema, generated from the migrations (make schema); a test keeps the two equal.

-- Name: alias_history; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.alias_history (
    id bigint NOT NULL,
    alias text NOT NULL,
    version text NOT NULL,
    previous text,
    action text NOT NULL,
    moved_at timestamp with time zone DEFAULT now() NOT NULL,
    reason text,
    CONSTRAINT alias_history_action_check CHECK ((action = ANY (ARRAY['publish'::text, 'swap'::text, 'rollback'::text, 'promote'::text, 'shadow'::text, 'canary'::text, 'abort'::text])))
);

-- Name: alias_history_id_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.alias_history ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.alias_history_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: aliases; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.aliases (
    alias text NOT NULL,
    index_name text NOT NULL,
    version text NOT NULL,
    shadow_version text,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    canary_version text,
    canary_percent double precision,
    canary_guards jsonb DEFAULT '[]'::jsonb NOT NULL,
    canary_min_queries integer DEFAULT 100 NOT NULL,
    canary_started_at timestamp with time zone,
    CONSTRAINT aliases_canary_min_queries_check CHECK ((canary_min_queries >= 1)),
    CONSTRAINT aliases_canary_percent_check CHECK (((canary_percent >= (0)::double precision) AND (canary_percent <= (100)::double precision)))
);

-- Name: chunks; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.chunks (
    chunk_key bigint NOT NULL,
    index_name text NOT NULL,
    doc_id text NOT NULL,
    chunk_id text NOT NULL,
    chunk_hash text NOT NULL,
    ordinal integer NOT NULL,
    heading_path text[] NOT NULL,
    char_start integer NOT NULL,
    char_end integer NOT NULL,
    token_count integer NOT NULL,
    text text NOT NULL,
    version text NOT NULL,
    status text NOT NULL,
    run_id bigint NOT NULL,
    retired_run_id bigint,
    indexed_at timestamp with time zone DEFAULT now() NOT NULL,
    retired_at timestamp with time zone,
    added_seq bigint,
    retired_seq bigint,
    valid_from timestamp with time zone,
    context text DEFAULT ''::text NOT NULL,
    page_start integer,
    page_end integer,
    page_label_start text,
    page_label_end text,
    CONSTRAINT chunks_check CHECK (((char_start >= 0) AND (char_end > char_start))),
    CONSTRAINT chunks_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'active'::text, 'superseded'::text, 'deleted'::text, 'discarded'::text, 'shadow'::text])))
);

-- Name: chunks_chunk_key_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.chunks ALTER COLUMN chunk_key ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.chunks_chunk_key_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: documents; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.documents (
    index_name text NOT NULL,
    doc_id text NOT NULL,
    source_uri text NOT NULL,
    content_hash text NOT NULL,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    metadata_hash text NOT NULL,
    chunker_version text NOT NULL,
    chunk_count integer NOT NULL,
    status text NOT NULL,
    first_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    deleted_at timestamp with time zone,
    last_run_id bigint,
    valid_from timestamp with time zone,
    CONSTRAINT documents_status_check CHECK ((status = ANY (ARRAY['active'::text, 'deleted'::text])))
);

-- Name: embeddings; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.embeddings (
    model_id text NOT NULL,
    chunk_hash text NOT NULL,
    dim integer NOT NULL,
    vector bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT embeddings_check CHECK ((octet_length(vector) = (4 * dim)))
);

-- Name: feedback; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.feedback (
    feedback_id bigint NOT NULL,
    request_id text NOT NULL,
    index_name text NOT NULL,
    alias text NOT NULL,
    version text NOT NULL,
    chunk_id text,
    kind text NOT NULL,
    source text NOT NULL,
    score double precision NOT NULL,
    query text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT feedback_kind_check CHECK ((kind = ANY (ARRAY['relevance'::text, 'faithfulness'::text, 'thumbs'::text]))),
    CONSTRAINT feedback_score_check CHECK (((score >= ('-1'::integer)::double precision) AND (score <= (1)::double precision))),
    CONSTRAINT feedback_source_check CHECK ((source = ANY (ARRAY['user'::text, 'judge'::text])))
);

-- Name: feedback_feedback_id_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.feedback ALTER COLUMN feedback_id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.feedback_feedback_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: index_heads; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.index_heads (
    index_name text NOT NULL,
    version text NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);

-- Name: index_versions; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.index_versions (
    version text NOT NULL,
    version_seq bigint NOT NULL,
    index_name text NOT NULL,
    status text NOT NULL,
    parent_version text,
    run_id bigint,
    model_id text NOT NULL,
    full_build boolean DEFAULT false NOT NULL,
    artifact_uri text,
    manifest jsonb,
    metrics jsonb DEFAULT '{}'::jsonb NOT NULL,
    reason text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    validated_at timestamp with time zone,
    published_at timestamp with time zone,
    retired_at timestamp with time zone,
    CONSTRAINT index_versions_status_check CHECK ((status = ANY (ARRAY['building'::text, 'validated'::text, 'rejected'::text, 'published'::text, 'retired'::text, 'removed'::text])))
);

-- Name: index_versions_version_seq_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.index_versions ALTER COLUMN version_seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.index_versions_version_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: runs; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.runs (
    run_id bigint NOT NULL,
    index_name text NOT NULL,
    source text NOT NULL,
    status text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    counts jsonb DEFAULT '{}'::jsonb NOT NULL,
    stage_seconds jsonb DEFAULT '{}'::jsonb NOT NULL,
    skipped jsonb DEFAULT '[]'::jsonb NOT NULL,
    error text,
    owner text DEFAULT 'cli'::text NOT NULL,
    lease_until timestamp with time zone,
    state jsonb,
    CONSTRAINT runs_status_check CHECK ((status = ANY (ARRAY['running'::text, 'succeeded'::text, 'failed'::text])))
);

-- Name: runs_run_id_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.runs ALTER COLUMN run_id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.runs_run_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: shadow_excluded; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.shadow_excluded (
    index_name text NOT NULL,
    version_seq bigint NOT NULL,
    chunk_key bigint NOT NULL
);

-- Name: source_objects; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.source_objects (
    index_name text NOT NULL,
    source text NOT NULL,
    doc_id text NOT NULL,
    etag text,
    size bigint NOT NULL,
    mtime timestamp with time zone,
    fingerprint text NOT NULL,
    content_hash text,
    skip_reason text,
    skip_gone boolean DEFAULT false NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT source_objects_check CHECK (((content_hash IS NULL) <> (skip_reason IS NULL)))
);

-- Name: version_stats; Type: TABLE; Schema: public; Owner: -

CREATE TABLE public.version_stats (
    id bigint NOT NULL,
    alias text NOT NULL,
    version text NOT NULL,
    role text NOT NULL,
    queries bigint NOT NULL,
    compared bigint NOT NULL,
    overlap_sum double precision NOT NULL,
    latency_buckets bigint[] NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT version_stats_compared_check CHECK ((compared >= 0)),
    CONSTRAINT version_stats_queries_check CHECK ((queries >= 0)),
    CONSTRAINT version_stats_role_check CHECK ((role = ANY (ARRAY['live'::text, 'canary'::text, 'shadow'::text])))
);

-- Name: version_stats_id_seq; Type: SEQUENCE; Schema: public; Owner: -

ALTER TABLE public.version_stats ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.version_stats_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- Name: alias_history alias_history_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.alias_history
    ADD CONSTRAINT alias_history_pkey PRIMARY KEY (id);

-- Name: aliases aliases_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_pkey PRIMARY KEY (alias);

-- Name: chunks chunks_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.chunks
    ADD CONSTRAINT chunks_pkey PRIMARY KEY (chunk_key);

-- Name: documents documents_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.documents
    ADD CONSTRAINT documents_pkey PRIMARY KEY (index_name, doc_id);

-- Name: embeddings embeddings_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.embeddings
    ADD CONSTRAINT embeddings_pkey PRIMARY KEY (model_id, chunk_hash);

-- Name: feedback feedback_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.feedback
    ADD CONSTRAINT feedback_pkey PRIMARY KEY (feedback_id);

-- Name: index_heads index_heads_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.index_heads
    ADD CONSTRAINT index_heads_pkey PRIMARY KEY (index_name);

-- Name: index_versions index_versions_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.index_versions
    ADD CONSTRAINT index_versions_pkey PRIMARY KEY (version);

-- Name: index_versions index_versions_version_seq_key; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.index_versions
    ADD CONSTRAINT index_versions_version_seq_key UNIQUE (version_seq);

-- Name: runs runs_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (run_id);

-- Name: shadow_excluded shadow_excluded_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.shadow_excluded
    ADD CONSTRAINT shadow_excluded_pkey PRIMARY KEY (version_seq, chunk_key);

-- Name: source_objects source_objects_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.source_objects
    ADD CONSTRAINT source_objects_pkey PRIMARY KEY (index_name, source, doc_id);

-- Name: version_stats version_stats_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.version_stats
    ADD CONSTRAINT version_stats_pkey PRIMARY KEY (id);

-- Name: alias_history_alias; Type: INDEX; Schema: public; Owner: -

CREATE INDEX alias_history_alias ON public.alias_history USING btree (alias, id DESC);

-- Name: chunks_active_chunk_id; Type: INDEX; Schema: public; Owner: -

CREATE UNIQUE INDEX chunks_active_chunk_id ON public.chunks USING btree (index_name, chunk_id) WHERE (status = 'active'::text);

-- Name: chunks_active_doc; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_active_doc ON public.chunks USING btree (index_name, doc_id) WHERE (status = 'active'::text);

-- Name: chunks_added_seq; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_added_seq ON public.chunks USING btree (index_name, added_seq);

-- Name: chunks_discarded; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_discarded ON public.chunks USING btree (index_name) WHERE (status = 'discarded'::text);

-- Name: chunks_doc; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_doc ON public.chunks USING btree (index_name, doc_id);

-- Name: chunks_retired_seq; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_retired_seq ON public.chunks USING btree (index_name, retired_seq) WHERE (retired_seq IS NOT NULL);

-- Name: chunks_shadow; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_shadow ON public.chunks USING btree (index_name, added_seq) WHERE (status = 'shadow'::text);

-- Name: feedback_version; Type: INDEX; Schema: public; Owner: -

CREATE INDEX feedback_version ON public.feedback USING btree (index_name, version);

-- Name: index_versions_index; Type: INDEX; Schema: public; Owner: -

CREATE INDEX index_versions_index ON public.index_versions USING btree (index_name, version_seq DESC);

-- Name: runs_index_started; Type: INDEX; Schema: public; Owner: -

CREATE INDEX runs_index_started ON public.runs USING btree (index_name, started_at DESC);

-- Name: shadow_excluded_index; Type: INDEX; Schema: public; Owner: -

CREATE INDEX shadow_excluded_index ON public.shadow_excluded USING btree (index_name, version_seq);

-- Name: version_stats_version; Type: INDEX; Schema: public; Owner: -

CREATE INDEX version_stats_version ON public.version_stats USING btree (version, role, recorded_at);

-- Name: alias_history alias_history_previous_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.alias_history
    ADD CONSTRAINT alias_history_previous_fkey FOREIGN KEY (previous) REFERENCES public.index_versions(version);

-- Name: alias_history alias_history_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.alias_history
    ADD CONSTRAINT alias_history_version_fkey FOREIGN KEY (version) REFERENCES public.index_versions(version);

-- Name: aliases aliases_canary_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_canary_version_fkey FOREIGN KEY (canary_version) REFERENCES public.index_versions(version);

-- Name: aliases aliases_shadow_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_shadow_version_fkey FOREIGN KEY (shadow_version) REFERENCES public.index_versions(version);

-- Name: aliases aliases_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_version_fkey FOREIGN KEY (version) REFERENCES public.index_versions(version);

-- Name: feedback feedback_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.feedback
    ADD CONSTRAINT feedback_version_fkey FOREIGN KEY (version) REFERENCES public.index_versions(version);

-- Name: index_heads index_heads_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.index_heads
    ADD CONSTRAINT index_heads_version_fkey FOREIGN KEY (version) REFERENCES public.index_versions(version);

-- Name: index_versions index_versions_parent_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.index_versions
    ADD CONSTRAINT index_versions_parent_version_fkey FOREIGN KEY (parent_version) REFERENCES public.index_versions(version);

-- Name: shadow_excluded shadow_excluded_chunk_key_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.shadow_excluded
    ADD CONSTRAINT shadow_excluded_chunk_key_fkey FOREIGN KEY (chunk_key) REFERENCES public.chunks(chunk_key) ON DELETE CASCADE;

-- Name: version_stats version_stats_version_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.version_stats
    ADD CONSTRAINT version_stats_version_fkey FOREIGN KEY (version) REFERENCES public.index_versions(version) ON DELETE CASCADE;
