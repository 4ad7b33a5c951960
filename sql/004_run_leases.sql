-- 004: runs whose steps execute in separate processes (orchestrated runs).
--
-- An in-process run holds the index's advisory lock from start to finish. An orchestrated run
-- (one Airflow task per step) cannot: each step takes the lock for its own duration, and between
-- steps the index stays reserved for the run by its lease. A run of another owner does not start
-- while a lease is live; a new run of the same owner (an orchestrator running one run at a time)
-- takes over that owner's unfinished runs. `state` carries the run's plan from step to step.
ALTER TABLE runs ADD COLUMN owner text NOT NULL DEFAULT 'cli';
ALTER TABLE runs ADD COLUMN lease_until timestamptz;
ALTER TABLE runs ADD COLUMN state jsonb;
