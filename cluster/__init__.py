"""A local Airflow 3 cluster for ragpipe's DAGs: CeleryExecutor workers that share no disk, artifacts on S3.

``python -m cluster up|run|down|status`` (``make cluster``, ``make cluster-run``, ``make cluster-down``).
The processes run as plain processes on this machine, each with its pid file, log and working
directory under one cluster directory; see ``cluster.control``.
"""
