-- The event store: the source of truth. Layout of postgres-es's `events` and `snapshots`
-- tables (it inserts and selects these columns by name), plus what reading in commit order
-- needs: a global position and the id of the inserting transaction.

CREATE TABLE events
(
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence >= 0),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    -- Insertion order across all aggregates. NOT commit order: a transaction can take a
    -- position and commit after a later one has.
    global_position bigint      NOT NULL GENERATED ALWAYS AS IDENTITY,
    -- The inserting transaction. Readers only read rows whose transaction is older than
    -- every transaction still in flight (pg_snapshot_xmin), in (tx_id, global_position)
    -- order, so no row can appear later behind their cursor.
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position_idx ON events (global_position);
CREATE INDEX events_commit_order_idx ON events (tx_id, global_position);

-- Snapshots of aggregates with long histories (postgres-es snapshot store).
CREATE TABLE snapshots
(
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The relay's position per JetStream stream: the last event (in commit order) that the
-- stream acknowledged. Written only after JetStream acked.
CREATE TABLE relay_positions
(
    stream          text        PRIMARY KEY,
    tx_id           xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Idempotency keys of POST /jobs: the first request's body hash and the job id it created.
CREATE TABLE idempotency_keys
(
    key          text        PRIMARY KEY,
    request_hash text        NOT NULL,
    aggregate_id text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
