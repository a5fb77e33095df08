-- Read models of jobs and runs, built by the projector from the event stream. Disposable:
-- they can be rebuilt from the events at any time. Tables are referenced unqualified so a
-- rebuild can build a shadow copy in another schema (search_path) and swap it in.

-- One row per projection: how far it has applied the event stream, written in the same
-- transaction as the rows it describes.
CREATE TABLE projection_checkpoints
(
    projection      text        PRIMARY KEY,
    -- The relay cursor of the last applied event (commit order): (tx_id, global_position).
    tx_id           xid8        NOT NULL DEFAULT '0',
    position        bigint      NOT NULL DEFAULT 0,
    -- JetStream sequence of the last applied message (0 when built from the event store).
    stream_sequence bigint      NOT NULL DEFAULT 0,
    events_applied  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Set when the projection stopped on an event it cannot apply (unknown type/version).
    last_error      text
);

CREATE TABLE read_jobs
(
    job_id         uuid        PRIMARY KEY,
    name           text        NOT NULL,
    account        text        NOT NULL,
    submitted_by   text        NOT NULL,
    priority       smallint    NOT NULL,
    gpus           smallint    NOT NULL,
    gpu_memory_mb  bigint      NOT NULL,
    state          text        NOT NULL,
    spec           jsonb       NOT NULL,
    labels         jsonb       NOT NULL,
    max_retries    int         NOT NULL,
    attempts       int         NOT NULL DEFAULT 0,
    current_run_id uuid,
    eligible_at    timestamptz,
    failure_reason text,
    submitted_at   timestamptz NOT NULL,
    assigned_at    timestamptz,
    started_at     timestamptz,
    finished_at    timestamptz,
    cancelled_at   timestamptz,
    updated_at     timestamptz NOT NULL,
    -- The job aggregate's sequence and the global position of its last applied event.
    version        bigint      NOT NULL,
    position       bigint      NOT NULL
);
CREATE INDEX read_jobs_submitted_idx ON read_jobs (submitted_at DESC, job_id DESC);
CREATE INDEX read_jobs_state_idx ON read_jobs (state, submitted_at DESC, job_id DESC);
CREATE INDEX read_jobs_account_idx ON read_jobs (account, submitted_at DESC, job_id DESC);
CREATE INDEX read_jobs_labels_idx ON read_jobs USING gin (labels jsonb_path_ops);

CREATE TABLE read_runs
(
    run_id         uuid        PRIMARY KEY,
    job_id         uuid        NOT NULL,
    attempt        int         NOT NULL,
    executor_id    text        NOT NULL,
    gpu_uuids      text[]      NOT NULL,
    state          text        NOT NULL,
    decision       jsonb       NOT NULL,
    assigned_at    timestamptz NOT NULL,
    started_at     timestamptz,
    ended_at       timestamptz,
    exit_code      int,
    signal         int,
    failure_reason text,
    retryable      boolean,
    last_progress  double precision,
    last_metrics   jsonb,
    progress_at    timestamptz
);
CREATE INDEX read_runs_job_idx ON read_runs (job_id, attempt);
