-- Read model of GPU usage, built by the projector's usage projection from job events (who
-- submitted, which GPUs a run was given, when it started and ended) and executor events (the
-- model of each GPU). Disposable and referenced unqualified like the other read models; it
-- keeps its own job and GPU tables so it depends on no other projection's rows.

-- The account and user of each job, from its JobSubmitted, and the job's applied sequence.
CREATE TABLE read_usage_jobs
(
    job_id       uuid   PRIMARY KEY,
    account      text   NOT NULL,
    submitted_by text   NOT NULL,
    version      bigint NOT NULL
);

-- The model of each GPU, from the executors' registrations.
CREATE TABLE read_usage_gpus
(
    gpu_uuid text PRIMARY KEY,
    model    text NOT NULL
);

-- One row per assigned run: GPUs from RunAssigned, started_at from RunStarted (NULL until
-- then: a run that never started allocated nothing), ended_at from its end (NULL while running:
-- it counts up to now).
CREATE TABLE read_usage_runs
(
    run_id       uuid        PRIMARY KEY,
    job_id       uuid        NOT NULL,
    account      text        NOT NULL,
    submitted_by text        NOT NULL,
    executor_id  text        NOT NULL,
    gpu_count    int         NOT NULL,
    gpu_uuids    text[]      NOT NULL,
    -- The model of its first GPU if the executor registered it; NULL otherwise.
    gpu_model    text,
    started_at   timestamptz,
    ended_at     timestamptz
);
CREATE INDEX read_usage_runs_account_idx ON read_usage_runs (account, started_at);
CREATE INDEX read_usage_runs_open_idx ON read_usage_runs (started_at) WHERE ended_at IS NULL;
