-- The current schema, generated from the migrations (make schema); a test keeps the two equal.

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
    CONSTRAINT chunks_check CHECK (((char_start >= 0) AND (char_end > char_start))),
    CONSTRAINT chunks_status_check CHECK ((status = ANY (ARRAY['active'::text, 'superseded'::text, 'deleted'::text])))
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

-- Name: chunks chunks_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.chunks
    ADD CONSTRAINT chunks_pkey PRIMARY KEY (chunk_key);

-- Name: documents documents_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.documents
    ADD CONSTRAINT documents_pkey PRIMARY KEY (index_name, doc_id);

-- Name: embeddings embeddings_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.embeddings
    ADD CONSTRAINT embeddings_pkey PRIMARY KEY (model_id, chunk_hash);

-- Name: runs runs_pkey; Type: CONSTRAINT; Schema: public; Owner: -

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (run_id);

-- Name: chunks_active_chunk_id; Type: INDEX; Schema: public; Owner: -

CREATE UNIQUE INDEX chunks_active_chunk_id ON public.chunks USING btree (index_name, chunk_id) WHERE (status = 'active'::text);

-- Name: chunks_active_doc; Type: INDEX; Schema: public; Owner: -

CREATE INDEX chunks_active_doc ON public.chunks USING btree (index_name, doc_id) WHERE (status = 'active'::text);

-- Name: runs_index_started; Type: INDEX; Schema: public; Owner: -

CREATE INDEX runs_index_started ON public.runs USING btree (index_name, started_at DESC);
