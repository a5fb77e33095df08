//! Executes commands against the aggregates through cqrs-es / postgres-es and reports what
//! was recorded: the aggregate's new version and the global position of its last event
//! (the consistency token later reads wait for).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework};
use overfly_domain::executor::{Executor, ExecutorCommand, ExecutorError};
use overfly_domain::job::{Job, JobCommand, JobError, JobServices};

use crate::event_store::{CommandScope, EventRepository, SCOPE};
use crate::group_commit::GroupAppender;

type Framework<A> = CqrsFramework<A, PersistedEventStore<EventRepository, A>>;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

/// Executors heartbeat every few seconds: snapshot them so loading stays cheap.
const EXECUTOR_SNAPSHOT_EVERY: usize = 100;
/// A command that loses the optimistic-concurrency race is re-run on the fresh state this
/// many times before the caller gets a 409.
const MAX_ATTEMPTS: u32 = 8;

/// Who asked, and the trace this command belongs to. Stored in every event's metadata.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub actor: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
}

/// What a successful command recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub aggregate_id: String,
    /// The aggregate's version (sequence of its last event) after the command.
    pub version: i64,
    /// Global position of the aggregate's last event after the command.
    pub position: i64,
    /// `false` when the command was accepted but changed nothing (e.g. a repeated report).
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    #[error(transparent)]
    Domain(E),
    #[error("the {0} changed concurrently {MAX_ATTEMPTS} times; retry")]
    Conflict(&'static str),
    #[error("event store: {0}")]
    Store(String),
}

pub struct CommandBus {
    jobs: Framework<Job>,
    executors: Framework<Executor>,
    pool: PgPool,
    committed: Arc<Notify>,
    /// Also notified after every commit (the scheduler), when set.
    listener: Option<Arc<Notify>>,
}

impl CommandBus {
    /// `committed` is notified after every commit, so an in-process relay publishes at once.
    /// Starts the group committer's writers: call it inside a Tokio runtime.
    pub fn new(pool: PgPool, services: JobServices, committed: Arc<Notify>) -> Self {
        let group = GroupAppender::start(pool.clone());
        Self {
            jobs: CqrsFramework::new(
                PersistedEventStore::new_event_store(EventRepository::new(
                    pool.clone(),
                    group.clone(),
                )),
                vec![],
                services,
            ),
            executors: CqrsFramework::new(
                PersistedEventStore::new_snapshot_store(
                    EventRepository::new(pool.clone(), group),
                    EXECUTOR_SNAPSHOT_EVERY,
                ),
                vec![],
                (),
            ),
            pool,
            committed,
            listener: None,
        }
    }

    /// Also notify `listener` after every commit.
    pub fn with_listener(mut self, listener: Arc<Notify>) -> Self {
        self.listener = Some(listener);
        self
    }

    fn notify(&self) {
        self.committed.notify_one();
        if let Some(listener) = &self.listener {
            listener.notify_one();
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn job(
        &self,
        job_id: Uuid,
        command: JobCommand,
        ctx: &CommandContext,
    ) -> Result<Recorded, CommandError<JobError>> {
        self.job_command(job_id, command, ctx, false).await
    }

    /// Like [`CommandBus::job`] for a job id generated for this very command (a submit
    /// without a replayed idempotency key): the empty aggregate is not loaded.
    pub async fn new_job(
        &self,
        job_id: Uuid,
        command: JobCommand,
        ctx: &CommandContext,
    ) -> Result<Recorded, CommandError<JobError>> {
        self.job_command(job_id, command, ctx, true).await
    }

    #[tracing::instrument(skip_all, fields(job_id = %job_id, command = command.name()))]
    async fn job_command(
        &self,
        job_id: Uuid,
        command: JobCommand,
        ctx: &CommandContext,
        known_new: bool,
    ) -> Result<Recorded, CommandError<JobError>> {
        let name = command.name();
        self.execute(
            &self.jobs,
            &job_id.to_string(),
            command,
            name,
            ctx,
            known_new,
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(executor_id = %executor_id, command = command.name()))]
    pub async fn executor(
        &self,
        executor_id: &str,
        command: ExecutorCommand,
        ctx: &CommandContext,
    ) -> Result<Recorded, CommandError<ExecutorError>> {
        let name = command.name();
        self.execute(&self.executors, executor_id, command, name, ctx, false)
            .await
    }

    async fn execute<A>(
        &self,
        cqrs: &Framework<A>,
        aggregate_id: &str,
        command: A::Command,
        name: &'static str,
        ctx: &CommandContext,
        known_new: bool,
    ) -> Result<Recorded, CommandError<A::Error>>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        let command_id = Uuid::new_v4().to_string();
        let metadata = metadata(ctx, name, &command_id);
        for attempt in 1..=MAX_ATTEMPTS {
            let scope = CommandScope {
                // Only the first attempt: a conflict means the aggregate exists after all.
                known_new: known_new && attempt == 1,
                appended: std::cell::Cell::new(None),
            };
            let outcome = SCOPE
                .scope(scope, async {
                    let outcome = cqrs
                        .execute_with_metadata(aggregate_id, command.clone(), metadata.clone())
                        .await;
                    (outcome, SCOPE.with(|scope| scope.appended.get()))
                })
                .await;
            match outcome {
                (Ok(()), Some((version, position))) => {
                    self.notify();
                    return Ok(Recorded {
                        aggregate_id: aggregate_id.to_string(),
                        version,
                        position,
                        changed: true,
                    });
                }
                (Ok(()), None) => {
                    self.notify();
                    return self.recorded(A::TYPE, aggregate_id, &command_id).await;
                }
                (Err(AggregateError::AggregateConflict), _) => {
                    tracing::debug!(attempt, "optimistic concurrency conflict; re-running");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
                }
                (Err(AggregateError::UserError(error)), _) => {
                    return Err(CommandError::Domain(error));
                }
                (Err(other), _) => return Err(CommandError::Store(other.to_string())),
            }
        }
        Err(CommandError::Conflict(A::TYPE))
    }

    /// The version and position after a command whose append did not report them (a
    /// snapshot was written with its events, or it recorded nothing): of its own last event,
    /// or of the aggregate's last event when it recorded none.
    async fn recorded<E: std::error::Error>(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: &str,
    ) -> Result<Recorded, CommandError<E>> {
        let store_error = |e: sqlx::Error| CommandError::Store(e.to_string());
        // The command's own last event (found scanning back from the aggregate's end) …
        let own: Option<(i64, i64)> = sqlx::query_as(
            "SELECT sequence, global_position FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2 AND metadata->>'command_id' = $3
              ORDER BY sequence DESC LIMIT 1",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(command_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        if let Some((version, position)) = own {
            return Ok(Recorded {
                aggregate_id: aggregate_id.to_string(),
                version,
                position,
                changed: true,
            });
        }
        // … or, when it recorded nothing, the aggregate's current last event.
        let last: Option<(i64, i64)> = sqlx::query_as(
            "SELECT sequence, global_position FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2
              ORDER BY sequence DESC LIMIT 1",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        let (version, position) = last.unwrap_or((0, 0));
        Ok(Recorded {
            aggregate_id: aggregate_id.to_string(),
            version,
            position,
            changed: false,
        })
    }
}

fn metadata(ctx: &CommandContext, command: &str, command_id: &str) -> HashMap<String, String> {
    let mut metadata = HashMap::from([
        ("actor".to_string(), ctx.actor.clone()),
        ("command".to_string(), command.to_string()),
        ("command_id".to_string(), command_id.to_string()),
        ("correlation_id".to_string(), ctx.correlation_id.clone()),
    ]);
    if let Some(causation) = &ctx.causation_id {
        metadata.insert("causation_id".to_string(), causation.clone());
    }
    if let Some(traceparent) = &ctx.traceparent {
        metadata.insert("traceparent".to_string(), traceparent.clone());
    }
    metadata
}
