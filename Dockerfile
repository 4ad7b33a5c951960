# ragpipe on the official Airflow 3 image: the same image runs the `ragpipe` CLI and Airflow's services.
FROM apache/airflow:3.3.2-python3.11

USER root
RUN mkdir -p /opt/ragpipe/home /opt/ragpipe/artifacts && chown -R airflow:root /opt/ragpipe
USER airflow
WORKDIR /opt/ragpipe
# torch first and pinned (the package itself does not pin it), so that sentence-transformers finds it
# and pulls nothing bigger
RUN pip install --no-cache-dir "torch==2.13.0"
COPY --chown=airflow:root pyproject.toml README.md LICENSE ./
COPY --chown=airflow:root pipeline ./pipeline
COPY --chown=airflow:root registry ./registry
COPY --chown=airflow:root retrieval ./retrieval
COPY --chown=airflow:root dags ./dags
COPY --chown=airflow:root sql ./sql
# the image's own Airflow stays as it is: pip may add ragpipe's dependencies, never replace Airflow.
# A regular (not editable) install: the migrations and DAG files are the package's own data.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" ".[airflow]"

ENV HF_HUB_OFFLINE=1 \
    RAGPIPE_HOME=/opt/ragpipe/home
