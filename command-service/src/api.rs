//! The command API (poem-openapi): one endpoint per command, health and readiness.
//!
//! Every command answers with the aggregate id, its new version and the global position of
//! its last event — the consistency token queries can wait for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use poem::Request;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use cqrs_es::EventStore;
use cqrs_es::persist::PersistedEventStore;
use overfly_domain::FieldError;
use overfly_domain::executor::{ExecutorCommand, GpuInfo};
use overfly_domain::job::{self, Job, JobCommand, JobError, JobSpec, SchedulingDecision};
use postgres_es::PostgresEventRepository;

use overfly_domain::executor::ExecutorError;
use overfly_http::trace::current_traceparent;
use overfly_http::{ApiError, Body};

use crate::bus::{CommandBus, CommandContext, CommandError, Recorded};
use crate::idempotency::{self, Claim, ClaimError};

#[derive(Tags)]
enum Tag {
    /// Submit and steer jobs (users).
    Jobs,
    /// Run reports and assignments (executors and the scheduler).
    Runs,
    /// Executor registration, heartbeats and lifecycle.
    Executors,
    /// Liveness and readiness.
    Health,
}

/// What a command recorded.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Accepted {
    /// The aggregate the command was applied to (job or executor id).
    pub id: String,
    /// The aggregate's version after the command (sequence of its last event).
    pub version: i64,
    /// Global position of the aggregate's last event: pass it as `min_position` to a query
    /// to read your own write.
    pub position: i64,
}

impl From<Recorded> for Accepted {
    fn from(recorded: Recorded) -> Self {
        Self {
            id: recorded.aggregate_id,
            version: recorded.version,
            position: recorded.position,
        }
    }
}

#[derive(ApiResponse)]
enum SubmitResponse {
    /// The job is queued. A replayed `Idempotency-Key` answers with the first response.
    #[oai(status = 201)]
    Created(
        Json<Accepted>,
        #[oai(header = "Location")] String,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

/// A job submission.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// Human-readable name (1–128 characters).
    pub name: String,
    /// Account whose share the job spends: `[A-Za-z0-9_-]{1,64}`.
    pub account: String,
    /// Who submits it.
    pub submitted_by: String,
    /// 0 (lowest) to 100 (highest).
    pub priority: i64,
    /// GPUs on one executor: 1 to 8.
    pub gpus: i64,
    /// Minimum memory per GPU in MiB (0 = any).
    #[oai(default)]
    #[serde(default)]
    pub gpu_memory_mb: i64,
    /// Program and arguments (argv; no shell).
    pub command: Vec<String>,
    /// Extra environment variables (`CUDA_VISIBLE_DEVICES` is set by the executor).
    #[oai(default)]
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Free-form JSON object for the workload, at most 64 KiB.
    #[oai(default)]
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    /// Labels, e.g. `{"benchmark": "tiles-v1"}`.
    #[oai(default)]
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Retries after retryable failures: 0 to 10.
    #[oai(default)]
    #[serde(default)]
    pub max_retries: i64,
    /// Wall-clock limit per run, seconds: 1 to 604800.
    pub timeout_s: i64,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

fn bounded<T: TryFrom<i64>>(field: &str, value: i64, min: i64, max: i64) -> Result<T, FieldError> {
    if value < min || value > max {
        return Err(FieldError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    T::try_from(value).map_err(|_| FieldError::new(field, "out of range"))
}

impl SubmitJob {
    fn into_spec(self) -> Result<JobSpec, FieldError> {
        let spec = JobSpec {
            priority: bounded("priority", self.priority, 0, job::MAX_PRIORITY.into())?,
            gpus: bounded("gpus", self.gpus, 1, job::MAX_GPUS.into())?,
            gpu_memory_mb: bounded(
                "gpu_memory_mb",
                self.gpu_memory_mb,
                0,
                job::MAX_GPU_MEMORY_MB as i64,
            )?,
            max_retries: bounded("max_retries", self.max_retries, 0, job::MAX_RETRIES.into())?,
            timeout_s: bounded("timeout_s", self.timeout_s, 1, job::MAX_TIMEOUT_S as i64)?,
            name: self.name,
            account: self.account,
            submitted_by: self.submitted_by,
            command: self.command,
            env: self.env,
            params: self.params,
            labels: self.labels,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// A job's specification as submitted (priority as it is now): what an executor needs to
/// start the job's runs (argv, environment, timeout).
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "snake_case")]
pub struct JobSpecView {
    pub job_id: String,
    pub name: String,
    pub account: String,
    pub submitted_by: String,
    pub priority: i64,
    pub gpus: i64,
    pub gpu_memory_mb: u64,
    /// Program and arguments (argv; no shell).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub params: serde_json::Value,
    pub labels: BTreeMap<String, String>,
    pub max_retries: i64,
    /// Wall-clock limit per run, seconds.
    pub timeout_s: u64,
}

impl JobSpecView {
    fn new(job_id: Uuid, spec: JobSpec) -> Self {
        Self {
            job_id: job_id.to_string(),
            name: spec.name,
            account: spec.account,
            submitted_by: spec.submitted_by,
            priority: spec.priority.into(),
            gpus: spec.gpus.into(),
            gpu_memory_mb: spec.gpu_memory_mb,
            command: spec.command,
            env: spec.env,
            params: spec.params,
            labels: spec.labels,
            max_retries: spec.max_retries.into(),
            timeout_s: spec.timeout_s,
        }
    }
}

/// Who asks for a change, and why (kept in the event for audits).
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct Reasoned {
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct ChangePriority {
    /// 0 to 100.
    pub priority: i64,
    pub by: String,
    pub reason: String,
}

/// The scheduler's placement of a job's next attempt.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct AssignRun {
    /// New id for the run (attempt).
    pub run_id: Uuid,
    pub executor_id: String,
    /// Exactly as many GPUs as the job asks for, all on `executor_id`.
    pub gpu_uuids: Vec<String>,
    /// Why this job and these GPUs: `score`, `priority`, `fair_share_factor`, `age_factor`,
    /// `overtook` (job ids), `placement`.
    #[oai(default)]
    #[serde(default)]
    pub decision: Option<serde_json::Value>,
}

/// A report from the executor that runs the run.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct RunReport {
    pub executor_id: String,
}

/// The end of a run (success or timeout), from the executor that ran it.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct RunEnd {
    pub executor_id: String,
    /// How busy the run's GPUs were, from the executor's telemetry; omitted if it sampled none.
    pub utilisation: Option<Utilisation>,
}

/// GPU utilisation over a run, summed over its GPUs.
#[derive(Debug, Clone, Copy, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct Utilisation {
    /// GPU-seconds covered by telemetry samples.
    pub gpu_seconds_sampled: f64,
    /// GPU-seconds busy: each sample's utilisation (0..=1) × its interval; ≤ sampled.
    pub gpu_seconds_busy: f64,
    /// The highest memory use seen on any of its GPUs, in MiB.
    pub peak_memory_mb: Option<u64>,
}

impl From<Utilisation> for overfly_domain::job::RunUtilisation {
    fn from(u: Utilisation) -> Self {
        Self {
            gpu_seconds_sampled: u.gpu_seconds_sampled,
            gpu_seconds_busy: u.gpu_seconds_busy,
            peak_memory_mb: u.peak_memory_mb,
        }
    }
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct RunProgress {
    pub executor_id: String,
    /// Increases with every report of the run; a repeated sequence is ignored.
    pub report_seq: i64,
    /// 0 to 1.
    pub progress: Option<f64>,
    #[oai(default)]
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct RunFailure {
    pub executor_id: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    /// Whether another attempt may succeed (e.g. the host died) or not (e.g. bad arguments).
    pub retryable: bool,
    /// How busy the run's GPUs were, from the executor's telemetry; omitted if it sampled none.
    pub utilisation: Option<Utilisation>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub uuid: String,
    pub index: i64,
    pub name: String,
    pub memory_mb: i64,
    /// `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct RegisterExecutor {
    /// `[A-Za-z0-9_-]{1,64}`, stable across restarts of the same host.
    pub executor_id: String,
    pub hostname: String,
    pub gpus: Vec<Gpu>,
    /// Seconds without a heartbeat before the executor counts as lost: 1 to 3600.
    pub lease_s: i64,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(deny_unknown_fields)]
pub struct Deregister {
    pub reason: String,
}

#[derive(Debug, Clone, Object)]
pub struct Health {
    pub status: String,
}

pub struct CommandApi {
    pub bus: Arc<CommandBus>,
    /// `None` only for the instance that renders the OpenAPI document offline.
    pub nats: Option<async_nats::Client>,
}

fn context(req: &Request, actor: impl Into<String>) -> CommandContext {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
    };
    CommandContext {
        actor: actor.into(),
        correlation_id: header("X-Correlation-Id").unwrap_or_else(|| Uuid::new_v4().to_string()),
        causation_id: header("X-Causation-Id"),
        traceparent: current_traceparent(),
    }
}

/// Path ids are parsed here rather than by the framework so that a bad one is a 400 naming
/// the parameter.
fn uuid_param(name: &str, value: &str) -> Result<Uuid, ApiError> {
    value.parse().map_err(|_| {
        ApiError::bad_request(
            format!("{name} must be a UUID, got {value:?}"),
            Some(name.into()),
        )
    })
}

fn executor_actor(executor_id: &str) -> String {
    format!("executor:{executor_id}")
}

fn invalid(error: FieldError) -> ApiError {
    ApiError::invalid(error.field, error.message)
}

/// How a domain error reads over HTTP: unknown aggregate 404, bad field 422, the rest (a
/// command that does not fit the current state) 409.
trait IntoApiError {
    fn into_api_error(self) -> ApiError;
}

impl IntoApiError for JobError {
    fn into_api_error(self) -> ApiError {
        match self {
            JobError::NotFound => ApiError::not_found("job not found"),
            JobError::Invalid(field) => invalid(field),
            other => ApiError::conflict(other.to_string()),
        }
    }
}

impl IntoApiError for ExecutorError {
    fn into_api_error(self) -> ApiError {
        match self {
            ExecutorError::NotFound => ApiError::not_found("executor not found"),
            ExecutorError::Invalid(field) => invalid(field),
            other => ApiError::conflict(other.to_string()),
        }
    }
}

impl<E: std::error::Error + IntoApiError> From<CommandError<E>> for ApiError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Domain(e) => e.into_api_error(),
            CommandError::Conflict(_) => ApiError::conflict(error.to_string()),
            CommandError::Store(_) => ApiError::internal(&error),
        }
    }
}

type Answer = Result<Json<Accepted>, ApiError>;

#[OpenApi]
impl CommandApi {
    /// Submit a job.
    ///
    /// With an `Idempotency-Key`, a retried request returns the first response and creates no
    /// second job; the same key with a different body is refused (422).
    #[oai(path = "/jobs", method = "post", tag = "Tag::Jobs")]
    async fn submit_job(
        &self,
        req: &Request,
        body: Body<SubmitJob>,
        #[oai(name = "Idempotency-Key")] idempotency_key: Header<Option<String>>,
    ) -> Result<SubmitResponse, ApiError> {
        let hash = match &idempotency_key.0 {
            Some(_) => idempotency::request_hash(
                &serde_json::to_value(&body.0).map_err(|e| ApiError::internal(&e))?,
            ),
            None => String::new(),
        };
        let spec = body.0.into_spec().map_err(invalid)?;
        let ctx = context(req, spec.submitted_by.clone());
        let idempotency_key_given = idempotency_key.0.is_some();
        let claim = match idempotency_key.0 {
            None => Claim::New(Uuid::new_v4()),
            Some(key) => idempotency::claim(self.bus.pool(), &key, &hash, Uuid::new_v4())
                .await
                .map_err(|e| match e {
                    ClaimError::Invalid(field) => invalid(field),
                    ClaimError::Mismatch => ApiError::invalid(idempotency::HEADER, e),
                    ClaimError::Store(e) => ApiError::internal(&e),
                })?,
        };
        // A keyed job id is known only to requests carrying that key: if the job exists,
        // another request with the same key created it, so answer as it was answered.
        let (job_id, keyed) = match &claim {
            Claim::New(id) => (*id, idempotency_key_given),
            Claim::Replay(id) => (*id, true),
        };
        let command = JobCommand::SubmitJob {
            job_id,
            spec,
            at: Utc::now(),
        };
        let outcome = match claim {
            Claim::New(_) => self.bus.new_job(job_id, command, &ctx).await,
            Claim::Replay(_) => self.bus.job(job_id, command, &ctx).await,
        };
        let (accepted, replayed) = match outcome {
            Ok(recorded) => (Accepted::from(recorded), false),
            Err(CommandError::Domain(JobError::AlreadySubmitted)) if keyed => {
                (self.first_response(job_id).await?, true)
            }
            Err(error) => return Err(error.into()),
        };
        let location = format!("/jobs/{job_id}");
        Ok(SubmitResponse::Created(
            Json(accepted),
            location,
            replayed.then_some(true),
        ))
    }

    /// Cancel a job that has not finished; a running process is stopped by its executor.
    #[oai(path = "/jobs/:job_id/cancel", method = "post", tag = "Tag::Jobs")]
    async fn cancel_job(
        &self,
        req: &Request,
        job_id: Path<String>,
        body: Body<Reasoned>,
    ) -> Answer {
        let Reasoned { by, reason } = body.0;
        let ctx = context(req, by.clone());
        let command = JobCommand::CancelJob {
            by,
            reason,
            at: Utc::now(),
        };
        self.job(uuid_param("job_id", &job_id)?, command, &ctx)
            .await
    }

    /// Change the priority of a job that has not finished.
    #[oai(path = "/jobs/:job_id/priority", method = "post", tag = "Tag::Jobs")]
    async fn change_priority(
        &self,
        req: &Request,
        job_id: Path<String>,
        body: Body<ChangePriority>,
    ) -> Answer {
        let ChangePriority {
            priority,
            by,
            reason,
        } = body.0;
        let priority =
            bounded("priority", priority, 0, job::MAX_PRIORITY.into()).map_err(invalid)?;
        let ctx = context(req, by.clone());
        let command = JobCommand::ChangePriority {
            priority,
            by,
            reason,
            at: Utc::now(),
        };
        self.job(uuid_param("job_id", &job_id)?, command, &ctx)
            .await
    }

    /// Retry a failed job once more.
    #[oai(path = "/jobs/:job_id/retry", method = "post", tag = "Tag::Jobs")]
    async fn retry_job(&self, req: &Request, job_id: Path<String>, body: Body<Reasoned>) -> Answer {
        let Reasoned { by, reason } = body.0;
        let ctx = context(req, by.clone());
        let command = JobCommand::RetryJob {
            by,
            reason,
            at: Utc::now(),
        };
        self.job(uuid_param("job_id", &job_id)?, command, &ctx)
            .await
    }

    /// The job's specification, read from its events (executors fetch it to start a run).
    #[oai(path = "/jobs/:job_id/spec", method = "get", tag = "Tag::Runs")]
    async fn job_spec(&self, job_id: Path<String>) -> Result<Json<JobSpecView>, ApiError> {
        let job_id = uuid_param("job_id", &job_id)?;
        let store = PersistedEventStore::<PostgresEventRepository, Job>::new_event_store(
            PostgresEventRepository::new(self.bus.pool().clone()),
        );
        let loaded = store
            .load_aggregate(&job_id.to_string())
            .await
            .map_err(|e| ApiError::internal(&e))?;
        let spec = loaded
            .aggregate
            .spec
            .ok_or_else(|| ApiError::not_found("job not found"))?;
        Ok(Json(JobSpecView::new(job_id, spec)))
    }

    /// Assign the job's next attempt to GPUs of one executor (the scheduler's command).
    #[oai(path = "/jobs/:job_id/runs", method = "post", tag = "Tag::Runs")]
    async fn assign_run(
        &self,
        req: &Request,
        job_id: Path<String>,
        body: Body<AssignRun>,
    ) -> Answer {
        let AssignRun {
            run_id,
            executor_id,
            gpu_uuids,
            decision,
        } = body.0;
        let decision: SchedulingDecision = match decision {
            None => SchedulingDecision::default(),
            Some(value) => {
                serde_json::from_value(value).map_err(|e| ApiError::invalid("decision", e))?
            }
        };
        let ctx = context(req, "scheduler");
        let command = JobCommand::AssignRun {
            run_id,
            executor_id,
            gpu_uuids,
            decision,
            at: Utc::now(),
        };
        self.job(uuid_param("job_id", &job_id)?, command, &ctx)
            .await
    }

    /// The executor started the run's process.
    #[oai(
        path = "/jobs/:job_id/runs/:run_id/started",
        method = "post",
        tag = "Tag::Runs"
    )]
    async fn run_started(
        &self,
        req: &Request,
        job_id: Path<String>,
        run_id: Path<String>,
        body: Body<RunReport>,
    ) -> Answer {
        self.report(
            req,
            &job_id,
            &run_id,
            body.0.executor_id,
            |run_id, executor_id, at| JobCommand::ReportRunStarted {
                run_id,
                executor_id,
                at,
            },
        )
        .await
    }

    /// Progress and metrics of a running run.
    #[oai(
        path = "/jobs/:job_id/runs/:run_id/progress",
        method = "post",
        tag = "Tag::Runs"
    )]
    async fn run_progress(
        &self,
        req: &Request,
        job_id: Path<String>,
        run_id: Path<String>,
        body: Body<RunProgress>,
    ) -> Answer {
        let RunProgress {
            executor_id,
            report_seq,
            progress,
            metrics,
        } = body.0;
        let report_seq = bounded("report_seq", report_seq, 0, i64::MAX).map_err(invalid)?;
        self.report(
            req,
            &job_id,
            &run_id,
            executor_id,
            |run_id, executor_id, at| JobCommand::ReportRunProgress {
                run_id,
                executor_id,
                report_seq,
                progress,
                metrics,
                at,
            },
        )
        .await
    }

    /// The run's process exited successfully.
    #[oai(
        path = "/jobs/:job_id/runs/:run_id/succeeded",
        method = "post",
        tag = "Tag::Runs"
    )]
    async fn run_succeeded(
        &self,
        req: &Request,
        job_id: Path<String>,
        run_id: Path<String>,
        body: Body<RunEnd>,
    ) -> Answer {
        let utilisation = body.0.utilisation.map(Into::into);
        self.report(
            req,
            &job_id,
            &run_id,
            body.0.executor_id,
            |run_id, executor_id, at| JobCommand::ReportRunSucceeded {
                run_id,
                executor_id,
                utilisation,
                at,
            },
        )
        .await
    }

    /// The run failed; a retryable failure is retried with backoff while retries are left.
    #[oai(
        path = "/jobs/:job_id/runs/:run_id/failed",
        method = "post",
        tag = "Tag::Runs"
    )]
    async fn run_failed(
        &self,
        req: &Request,
        job_id: Path<String>,
        run_id: Path<String>,
        body: Body<RunFailure>,
    ) -> Answer {
        let RunFailure {
            executor_id,
            exit_code,
            signal,
            reason,
            retryable,
            utilisation,
        } = body.0;
        let utilisation = utilisation.map(Into::into);
        self.report(
            req,
            &job_id,
            &run_id,
            executor_id,
            |run_id, executor_id, at| JobCommand::ReportRunFailed {
                run_id,
                executor_id,
                exit_code,
                signal,
                reason,
                retryable,
                utilisation,
                at,
            },
        )
        .await
    }

    /// The run exceeded its timeout and was killed.
    #[oai(
        path = "/jobs/:job_id/runs/:run_id/timed-out",
        method = "post",
        tag = "Tag::Runs"
    )]
    async fn run_timed_out(
        &self,
        req: &Request,
        job_id: Path<String>,
        run_id: Path<String>,
        body: Body<RunEnd>,
    ) -> Answer {
        let utilisation = body.0.utilisation.map(Into::into);
        self.report(
            req,
            &job_id,
            &run_id,
            body.0.executor_id,
            |run_id, executor_id, at| JobCommand::ReportRunTimedOut {
                run_id,
                executor_id,
                utilisation,
                at,
            },
        )
        .await
    }

    /// Register (or re-register after a restart) an executor and its GPUs.
    #[oai(path = "/executors", method = "post", tag = "Tag::Executors")]
    async fn register_executor(&self, req: &Request, body: Body<RegisterExecutor>) -> Answer {
        let RegisterExecutor {
            executor_id,
            hostname,
            gpus,
            lease_s,
        } = body.0;
        let gpus = gpus
            .into_iter()
            .enumerate()
            .map(|(i, gpu)| {
                Ok(GpuInfo {
                    uuid: gpu.uuid,
                    index: bounded(&format!("gpus[{i}].index"), gpu.index, 0, 1023)?,
                    name: gpu.name,
                    memory_mb: bounded(&format!("gpus[{i}].memory_mb"), gpu.memory_mb, 1, 1 << 20)?,
                    compute_capability: gpu.compute_capability,
                })
            })
            .collect::<Result<Vec<_>, FieldError>>()
            .map_err(invalid)?;
        let lease_s = bounded("lease_s", lease_s, 1, 3600).map_err(invalid)?;
        let ctx = context(req, executor_actor(&executor_id));
        let command = ExecutorCommand::RegisterExecutor {
            executor_id: executor_id.clone(),
            hostname,
            gpus,
            lease_s,
            at: Utc::now(),
        };
        self.executor(&executor_id, command, &ctx).await
    }

    /// The executor is alive: extends its lease.
    #[oai(
        path = "/executors/:executor_id/heartbeat",
        method = "post",
        tag = "Tag::Executors"
    )]
    async fn heartbeat(&self, req: &Request, executor_id: Path<String>) -> Answer {
        let ctx = context(req, executor_actor(&executor_id.0));
        let command = ExecutorCommand::Heartbeat { at: Utc::now() };
        self.executor(&executor_id.0, command, &ctx).await
    }

    /// Stop giving the executor new work; running work may finish.
    #[oai(
        path = "/executors/:executor_id/drain",
        method = "post",
        tag = "Tag::Executors"
    )]
    async fn drain(
        &self,
        req: &Request,
        executor_id: Path<String>,
        body: Body<Reasoned>,
    ) -> Answer {
        let Reasoned { by, reason } = body.0;
        let ctx = context(req, by.clone());
        let command = ExecutorCommand::Drain {
            by,
            reason,
            at: Utc::now(),
        };
        self.executor(&executor_id.0, command, &ctx).await
    }

    /// The executor leaves for good.
    #[oai(
        path = "/executors/:executor_id/deregister",
        method = "post",
        tag = "Tag::Executors"
    )]
    async fn deregister(
        &self,
        req: &Request,
        executor_id: Path<String>,
        body: Body<Deregister>,
    ) -> Answer {
        let ctx = context(req, executor_actor(&executor_id.0));
        let command = ExecutorCommand::Deregister {
            reason: body.0.reason,
            at: Utc::now(),
        };
        self.executor(&executor_id.0, command, &ctx).await
    }

    /// Mark an executor lost because its lease expired (the scheduler's lease watch).
    #[oai(
        path = "/executors/:executor_id/lost",
        method = "post",
        tag = "Tag::Executors"
    )]
    async fn lost(&self, req: &Request, executor_id: Path<String>) -> Answer {
        let ctx = context(req, "scheduler");
        let command = ExecutorCommand::MarkLost { at: Utc::now() };
        self.executor(&executor_id.0, command, &ctx).await
    }

    /// Liveness: the process answers.
    #[oai(path = "/healthz", method = "get", tag = "Tag::Health")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: Postgres and NATS are reachable.
    #[oai(path = "/readyz", method = "get", tag = "Tag::Health")]
    async fn readyz(&self) -> Result<Json<Health>, ApiError> {
        let postgres = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(self.bus.pool()),
        )
        .await;
        if !matches!(postgres, Ok(Ok(_))) {
            return Err(ApiError::unavailable("Postgres is not reachable"));
        }
        let connected = self.nats.as_ref().is_some_and(|nats| {
            nats.connection_state() == async_nats::connection::State::Connected
        });
        if !connected {
            return Err(ApiError::unavailable("NATS is not connected"));
        }
        Ok(Json(Health {
            status: "ready".into(),
        }))
    }
}

impl CommandApi {
    /// A run report: the reporting executor is the actor.
    async fn report(
        &self,
        req: &Request,
        job_id: &str,
        run_id: &str,
        executor_id: String,
        command: impl FnOnce(Uuid, String, chrono::DateTime<Utc>) -> JobCommand,
    ) -> Answer {
        let job_id = uuid_param("job_id", job_id)?;
        let run_id = uuid_param("run_id", run_id)?;
        let ctx = context(req, executor_actor(&executor_id));
        self.job(job_id, command(run_id, executor_id, Utc::now()), &ctx)
            .await
    }

    async fn job(&self, job_id: Uuid, command: JobCommand, ctx: &CommandContext) -> Answer {
        Ok(Json(self.bus.job(job_id, command, ctx).await?.into()))
    }

    async fn executor(
        &self,
        executor_id: &str,
        command: ExecutorCommand,
        ctx: &CommandContext,
    ) -> Answer {
        Ok(Json(
            self.bus.executor(executor_id, command, ctx).await?.into(),
        ))
    }

    /// The response the first `POST /jobs` of an idempotency key got: the job's first event.
    async fn first_response(&self, job_id: Uuid) -> Result<Accepted, ApiError> {
        let position: i64 = sqlx::query_scalar(
            "SELECT global_position FROM events
              WHERE aggregate_type = 'job' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(job_id.to_string())
        .fetch_one(self.bus.pool())
        .await
        .map_err(|e| ApiError::internal(&e))?;
        Ok(Accepted {
            id: job_id.to_string(),
            version: 1,
            position,
        })
    }
}
