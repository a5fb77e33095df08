-- Read models of executors and their GPUs, built by the projector's executors projection from
-- executor events (inventory, state, lease) and job run events (which run holds each GPU).
-- Disposable like the jobs tables, and referenced unqualified for the same reason.

CREATE TABLE read_executors
(
    executor_id       text        PRIMARY KEY,
    hostname          text        NOT NULL,
    -- registered, active, draining, lost or gone (deregistered).
    state             text        NOT NULL,
    -- 1 for the first registration, one more per re-registration (restart).
    session           int         NOT NULL,
    lease_s           int         NOT NULL,
    last_heartbeat_at timestamptz,
    lease_expires_at  timestamptz,
    -- The latest registration (the current session's).
    registered_at     timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    -- The executor aggregate's sequence and the global position of its last applied event.
    version           bigint      NOT NULL,
    position          bigint      NOT NULL
);
CREATE INDEX read_executors_state_idx ON read_executors (state, executor_id);

CREATE TABLE read_gpus
(
    gpu_uuid           text        PRIMARY KEY,
    executor_id        text        NOT NULL,
    index              int         NOT NULL,
    name               text        NOT NULL,
    memory_mb          bigint      NOT NULL,
    compute_capability text        NOT NULL,
    -- The run (and its job) holding this GPU since it was assigned; NULL while free.
    held_by_run        uuid,
    held_by_job        uuid,
    held_since         timestamptz,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX read_gpus_executor_idx ON read_gpus (executor_id, index);
CREATE INDEX read_gpus_run_idx ON read_gpus (held_by_run) WHERE held_by_run IS NOT NULL;
