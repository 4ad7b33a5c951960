"""The retrieval library applications import to search a published index (never imports Airflow)."""
