//! The event repository under cqrs-es: postgres-es for loading, snapshots and replays; plain
//! appends (no snapshot due) as single `INSERT … RETURNING` statements.
//!
//! postgres-es appends with `BEGIN`, one `INSERT` per event and `COMMIT`, and returns nothing.
//! A single statement is atomic on its own, costs one round trip, and returns the new
//! events' global positions, which the command answers with (no query afterwards). A command
//! that records one event (most do) goes through the group committer, which shares one
//! statement among concurrent commands. Conflicts keep postgres-es's meaning: a duplicate
//! `(aggregate_type, aggregate_id, sequence)` is an optimistic-lock error.

use std::cell::Cell;

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

use crate::group_commit::{GroupAppender, Outcome, Row};

/// What the last append of the current command wrote: `(last sequence, its global position)`.
pub type Appended = Option<(i64, i64)>;

/// Set by the command bus around one execution of a command.
pub struct CommandScope {
    /// The aggregate id was generated for this command just now, so the aggregate has no
    /// events and loading it can be skipped. Should it exist after all, appending sequence 1
    /// fails the primary key and the command is re-run with a real load.
    pub known_new: bool,
    /// Filled by `persist`.
    pub appended: Cell<Appended>,
}

tokio::task_local! {
    pub static SCOPE: CommandScope;
}

pub struct EventRepository {
    postgres_es: PostgresEventRepository,
    pool: PgPool,
    group: GroupAppender,
}

impl EventRepository {
    pub fn new(pool: PgPool, group: GroupAppender) -> Self {
        Self {
            postgres_es: PostgresEventRepository::new(pool.clone()),
            pool,
            group,
        }
    }

    async fn append_one<A: Aggregate>(
        &self,
        event: &SerializedEvent,
    ) -> Result<(), PersistenceError> {
        let sequence = event.sequence as i64;
        let row = Row {
            aggregate_type: A::TYPE,
            aggregate_id: event.aggregate_id.clone(),
            sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload: event.payload.clone(),
            metadata: event.metadata.clone(),
        };
        match self.group.append(row).await {
            Ok(Outcome::Appended(position)) => {
                let _ = SCOPE.try_with(|scope| scope.appended.set(Some((sequence, position))));
                Ok(())
            }
            Ok(Outcome::Conflict) => Err(PersistenceError::OptimisticLockError),
            Err(message) => Err(PersistenceError::UnknownError(message.into())),
        }
    }

    async fn append<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
    ) -> Result<(), PersistenceError> {
        let first = match events {
            [] => return Ok(()),
            [only] => return self.append_one::<A>(only).await,
            [first, ..] => first,
        };
        let mut sequences = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut versions = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut metadata = Vec::with_capacity(events.len());
        for event in events {
            sequences.push(event.sequence as i64);
            types.push(event.event_type.as_str());
            versions.push(event.event_version.as_str());
            payloads.push(&event.payload);
            metadata.push(&event.metadata);
        }
        let statement = "WITH appended AS (
                 INSERT INTO events
                        (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 SELECT $1, $2, e.sequence, e.event_type, e.event_version, e.payload, e.metadata
                   FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
                        AS e(sequence, event_type, event_version, payload, metadata)
                  ORDER BY e.sequence
                 RETURNING sequence, global_position)
             SELECT sequence, global_position FROM appended ORDER BY sequence DESC LIMIT 1";
        let last: (i64, i64) = sqlx::query_as(statement)
            .bind(A::TYPE)
            .bind(&first.aggregate_id)
            .bind(&sequences)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata)
            .fetch_one(&self.pool)
            .await
            .map_err(persistence_error)?;
        let _ = SCOPE.try_with(|scope| scope.appended.set(Some(last)));
        Ok(())
    }
}

fn persistence_error(error: sqlx::Error) -> PersistenceError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        _ => PersistenceError::UnknownError(Box::new(error)),
    }
}

impl PersistedEventRepository for EventRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        if SCOPE.try_with(|scope| scope.known_new).unwrap_or(false) {
            return Ok(Vec::new());
        }
        self.postgres_es.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.postgres_es
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.postgres_es.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        match snapshot_update {
            None => self.append::<A>(events).await,
            // Events and snapshot in one transaction: postgres-es does exactly that.
            Some(update) => self.postgres_es.persist::<A>(events, Some(update)).await,
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.postgres_es.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.postgres_es.stream_all_events::<A>().await
    }
}
