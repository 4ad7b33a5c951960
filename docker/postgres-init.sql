-- Run once by the postgres image on an empty data volume: Airflow's metadata gets its own
-- database beside the ragpipe registry (POSTGRES_DB).
CREATE DATABASE airflow OWNER ragpipe;
