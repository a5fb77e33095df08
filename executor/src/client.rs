//! The command service's HTTP API as the executor uses it. Transport errors, 5xx, 408 and
//! 429 are retried with backoff (every command the executor sends is idempotent: the domain
//! ignores a repeated report, progress carries a `report_seq`); any other 4xx is the command
//! service refusing, returned as [`ClientError::Refused`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::gpu::GpuInfo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The command service answered and said no (4xx): retrying the same request is useless.
    #[error("refused ({status}): {body}")]
    Refused { status: u16, body: String },
    /// Still failing when the attempts ran out.
    #[error("command service unreachable: {0}")]
    Unreachable(String),
}

/// How long to keep retrying a request.
#[derive(Debug, Clone, Copy)]
pub enum Attempts {
    /// Until it is accepted or refused (run ends, registration).
    Forever,
    /// At most this many tries (progress, heartbeats: a newer one follows).
    AtMost(u32),
}

/// GPU-seconds over a run, summed over its GPUs (sent with the run's end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Utilisation {
    pub gpu_seconds_sampled: f64,
    pub gpu_seconds_busy: f64,
    pub peak_memory_mb: Option<u64>,
}

/// `GET /jobs/{id}/spec`: what the executor needs of a job.
#[derive(Debug, Clone, Deserialize)]
pub struct JobSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_s: u64,
}

#[derive(Clone)]
pub struct CommandClient {
    base: String,
    http: reqwest::Client,
    pub executor_id: String,
}

impl CommandClient {
    pub fn new(base: &str, executor_id: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .expect("a plain HTTP client builds"),
            executor_id: executor_id.to_string(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        attempts: Attempts,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut request = self.http.request(method.clone(), &url);
            if let Some(body) = body {
                request = request.json(body);
            }
            let failure = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
                    }
                    let retry = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    if !retry {
                        return Err(ClientError::Refused {
                            status: status.as_u16(),
                            body: text,
                        });
                    }
                    format!("{status}: {text}")
                }
                Err(error) => error.to_string(),
            };
            if let Attempts::AtMost(max) = attempts
                && tries >= max
            {
                return Err(ClientError::Unreachable(failure));
            }
            tracing::warn!(%url, tries, error = %failure, "command service request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn post(
        &self,
        path: &str,
        body: Value,
        attempts: Attempts,
    ) -> Result<Value, ClientError> {
        self.send(reqwest::Method::POST, path, Some(&body), attempts)
            .await
    }

    pub async fn register(
        &self,
        hostname: &str,
        gpus: &[GpuInfo],
        lease_s: u64,
    ) -> Result<Value, ClientError> {
        let gpus: Vec<Value> = gpus
            .iter()
            .map(|g| {
                json!({
                    "uuid": g.uuid, "index": g.index, "name": g.name,
                    "memory_mb": g.memory_total_mb, "compute_capability": g.compute_capability,
                })
            })
            .collect();
        self.post(
            "/executors",
            json!({
                "executor_id": self.executor_id, "hostname": hostname,
                "gpus": gpus, "lease_s": lease_s,
            }),
            Attempts::Forever,
        )
        .await
    }

    pub async fn heartbeat(&self) -> Result<Value, ClientError> {
        self.post(
            &format!("/executors/{}/heartbeat", self.executor_id),
            json!({}),
            Attempts::AtMost(3),
        )
        .await
    }

    pub async fn drain(&self, reason: &str) -> Result<Value, ClientError> {
        self.post(
            &format!("/executors/{}/drain", self.executor_id),
            json!({"by": format!("executor:{}", self.executor_id), "reason": reason}),
            Attempts::AtMost(20),
        )
        .await
    }

    pub async fn deregister(&self, reason: &str) -> Result<Value, ClientError> {
        self.post(
            &format!("/executors/{}/deregister", self.executor_id),
            json!({"reason": reason}),
            Attempts::AtMost(20),
        )
        .await
    }

    pub async fn job_spec(&self, job_id: Uuid) -> Result<JobSpec, ClientError> {
        let value = self
            .send(
                reqwest::Method::GET,
                &format!("/jobs/{job_id}/spec"),
                None,
                Attempts::AtMost(30),
            )
            .await?;
        serde_json::from_value(value).map_err(|e| ClientError::Refused {
            status: 200,
            body: format!("unreadable job spec: {e}"),
        })
    }

    fn run_path(job_id: Uuid, run_id: Uuid, what: &str) -> String {
        format!("/jobs/{job_id}/runs/{run_id}/{what}")
    }

    pub async fn started(&self, job_id: Uuid, run_id: Uuid) -> Result<Value, ClientError> {
        self.post(
            &Self::run_path(job_id, run_id, "started"),
            json!({"executor_id": self.executor_id}),
            Attempts::Forever,
        )
        .await
    }

    pub async fn progress(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        report_seq: u64,
        progress: Option<f64>,
        metrics: &BTreeMap<String, f64>,
        attempts: Attempts,
    ) -> Result<Value, ClientError> {
        self.post(
            &Self::run_path(job_id, run_id, "progress"),
            json!({
                "executor_id": self.executor_id, "report_seq": report_seq,
                "progress": progress, "metrics": metrics,
            }),
            attempts,
        )
        .await
    }

    pub async fn succeeded(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        utilisation: Option<Utilisation>,
    ) -> Result<Value, ClientError> {
        self.post(
            &Self::run_path(job_id, run_id, "succeeded"),
            json!({"executor_id": self.executor_id, "utilisation": utilisation}),
            Attempts::Forever,
        )
        .await
    }

    pub async fn failed(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        failure: &Failure,
        utilisation: Option<Utilisation>,
    ) -> Result<Value, ClientError> {
        self.post(
            &Self::run_path(job_id, run_id, "failed"),
            json!({
                "executor_id": self.executor_id, "exit_code": failure.exit_code,
                "signal": failure.signal, "reason": failure.reason,
                "retryable": failure.retryable, "utilisation": utilisation,
            }),
            Attempts::Forever,
        )
        .await
    }

    pub async fn timed_out(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        utilisation: Option<Utilisation>,
    ) -> Result<Value, ClientError> {
        self.post(
            &Self::run_path(job_id, run_id, "timed-out"),
            json!({"executor_id": self.executor_id, "utilisation": utilisation}),
            Attempts::Forever,
        )
        .await
    }
}

/// A run's failure as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub retryable: bool,
}
