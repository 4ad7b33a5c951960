# ragpipe: `make run` indexes this repository's docs on the embedded defaults; `make test` runs every tier.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
# The CPU build of torch lies on this kind of machine's disk; elsewhere pip takes it from the index.
WHEELS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check $(WHEELS)
export HF_HUB_OFFLINE ?= 1

.PHONY: install run test test-fast bench-replay schema clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	# torch first, pinned: anything later that needs torch then finds it and never pulls a CUDA build
	$(PIP) $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PIP) -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -W ignore -c "import torch, sentence_transformers, hnswlib, psycopg, rank_bm25, pyarrow, pgserver, airflow, onnxruntime"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded defaults (unless RAGPIPE_DATABASE_URL is set): index this repository's
# own documentation (a second run finds nothing changed), then search it.
run: install
	$(VENV)/bin/ragpipe index . --index docs --include '*.md' --include '*.rst'
	$(VENV)/bin/ragpipe search "what happens to the chunks of a deleted document?" --index docs --k 3

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

bench-replay: install
	$(VENV)/bin/ragpipe replay $${RAGPIPE_SHARED_DATA:-../shared/data}/peps-replay --embedder deterministic --json

# Regenerate sql/schema.sql from the migrations (needs pg_dump and RAGPIPE_DATABASE_URL's server).
schema: install
	$(PY) -m registry.schema_dump > sql/schema.sql

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
