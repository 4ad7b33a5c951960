# ragpipe: `make run` runs the rag_index DAG over this repository's docs on the embedded defaults, then
# searches them; `make test` runs every tier.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
TORCH   := torch==2.13.0
# The CPU build of torch lies on this kind of machine's disk; elsewhere pip takes it from the index.
WHEELS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check $(WHEELS)
export HF_HUB_OFFLINE ?= 1
export RAGPIPE_HOME ?= $(CURDIR)/.ragpipe
# Airflow on its embedded default too: SQLite metadata under RAGPIPE_HOME, this repository's DAGs
AIRFLOW_HOME_DIR := $(RAGPIPE_HOME)/airflow
AIRFLOW_ENV := AIRFLOW_HOME=$(AIRFLOW_HOME_DIR) AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False RAGPIPE_INCLUDE='*.md,*.rst'
RUN_CONF := {"source": "$(CURDIR)", "index": "docs"}

.PHONY: install run test test-fast bench-replay bench schema clean cluster cluster-install cluster-run cluster-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	# torch first, pinned here (the package does not pin it): anything later that needs torch then
	# finds it and never pulls a CUDA build. [test] brings [pipeline] and [airflow].
	$(PIP) $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PIP) -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -W ignore -c "import torch, sentence_transformers, hnswlib, psycopg, rank_bm25, pyarrow, pgserver, airflow, onnxruntime, fastapi, uvicorn, prometheus_client, playwright"
	touch $(STAMP)

install: $(STAMP)

# the peers the replay benchmark compares with (the [bench] extra); the tests drive them too
$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[test,bench]' 2>&1 | grep -v "is ignored" || true
	$(PY) -W ignore -c "import langchain_core.indexing, langchain_classic.indexes, langchain_text_splitters, llama_index.core"
	touch $(BENCH_STAMP)

# The main job on the embedded defaults (unless RAGPIPE_DATABASE_URL is set): one run of the rag_index
# DAG over this repository's own documentation (a second run finds nothing changed), then a search.
run: install $(AIRFLOW_HOME_DIR)/airflow.db
	@echo "airflow dags test rag_index (log: $(AIRFLOW_HOME_DIR)/rag_index.log)"
	@$(AIRFLOW_ENV) $(VENV)/bin/airflow dags test rag_index -c '$(RUN_CONF)' > $(AIRFLOW_HOME_DIR)/rag_index.log 2>&1 \
		|| (tail -n 40 $(AIRFLOW_HOME_DIR)/rag_index.log; exit 1)
	@grep -o "DagRun Finished: dag_id=rag_index.*run_duration=[0-9.]*, state=[a-z]*" $(AIRFLOW_HOME_DIR)/rag_index.log \
		| sed 's/, logical_date.*run_duration=/: /; s/, state=/ s, /'
	@$(VENV)/bin/ragpipe runs list --index docs --limit 1
	$(VENV)/bin/ragpipe search "what happens to the chunks of a deleted document?" --index docs --k 3

$(AIRFLOW_HOME_DIR)/airflow.db: | install
	mkdir -p $(AIRFLOW_HOME_DIR)
	$(AIRFLOW_ENV) $(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME_DIR)/migrate.log 2>&1 \
		|| (tail -n 40 $(AIRFLOW_HOME_DIR)/migrate.log; exit 1)

# A local Airflow 3 cluster (no Docker): api-server, scheduler, dag-processor, triggerer, two Celery
# workers with working directories of their own, Redis (CLUSTER_REDIS, a database of its own) as the
# broker, PostgreSQL (CLUSTER_POSTGRES) for Airflow's metadata and the registry, moto's S3 server as
# the artifact store. Pid files and logs under CLUSTER_DIR; see cluster/ and the README.
CLUSTER_DIR      ?= $(CURDIR)/.cluster
CLUSTER_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/postgres
CLUSTER_REDIS    ?= redis://127.0.0.1:6379/13
CLUSTER := PYTHONPATH=$(CURDIR) $(PY) -m cluster --root $(CLUSTER_DIR) --repo $(CURDIR) \
	--postgres $(CLUSTER_POSTGRES) --redis $(CLUSTER_REDIS)

# the [cluster] extra (the Celery provider, the Redis client) when the environment lacks it; a
# virtual environment that exists is used as it is (not reinstalled because pyproject.toml is newer)
cluster-install:
	@test -x $(PY) || $(MAKE) install
	@$(PY) -c "import airflow.providers.celery, redis, psutil" 2>/dev/null || \
		$(PIP) -e '.[cluster]' 2>&1 | grep -v "is ignored" || true

cluster: cluster-install
	$(CLUSTER) up

# rag_index over this repository's docs (uploaded to the cluster's S3 server) through the Airflow
# REST API; the last line is JSON: {"dag_run_id", "state", "workers", "artifacts"}
cluster-run:
	$(CLUSTER) run

cluster-down:
	$(CLUSTER) down

# the checkout first on the path, for the tests and the subprocesses they start (benchmarks/ is not
# part of the installed package)
test: $(BENCH_STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/pytest -q

test-fast: $(BENCH_STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/pytest -q -m "not slow"

bench-replay: install
	$(VENV)/bin/ragpipe replay $${RAGPIPE_SHARED_DATA:-../shared/data}/peps-replay --embedder deterministic --json

# any benchmark of docs/benchmarks.md: make bench NAME=replay ARGS="--steps 20"
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks $(NAME) $(ARGS)

# Regenerate sql/schema.sql from the migrations (needs pg_dump and RAGPIPE_DATABASE_URL's server).
schema: install
	$(PY) -m registry.schema_dump > sql/schema.sql

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
