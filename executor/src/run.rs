//! One run: the job's argv as a child process in its own process group, with
//! `CUDA_VISIBLE_DEVICES` = the assigned GPUs, its log lines shipped to JetStream, its
//! progress lines reported (rate-limited), and its end reported exactly as it happened.
//!
//! How a run ends, and what is reported:
//! - exit 0 → `succeeded`;
//! - exit code ≠ 0 → `failed` with the code, **retryable**: the job's `max_retries` bounds the
//!   attempts (0 = never retried), so a flaky workload gets its retries and a broken one fails
//!   the job after them;
//! - killed by a signal the executor did not send (OOM killer, segfault) → `failed` with the
//!   signal, retryable;
//! - the program cannot be started (not found, not executable) or names GPUs this host does
//!   not have → `failed`, not retryable for the former (another attempt fails the same way),
//!   retryable for the latter (a new placement may fit);
//! - timeout (`timeout_s` of the spec, from the start) → SIGTERM to the group, SIGKILL after
//!   the kill grace, `timed-out`;
//! - cancel (`JobCancelled` naming this run) → SIGTERM, SIGKILL after the kill grace, then
//!   `failed`, not retryable, with the signal or code that ended it and "cancelled: …" (the job
//!   is cancelled already: the domain records the run's end and its utilisation, no retry);
//! - the command service refuses a report of the run (it ended elsewhere, e.g. the executor
//!   was marked lost) → SIGKILL, nothing more reported;
//! - executor shutdown past the drain grace → SIGTERM/SIGKILL, `failed` retryable
//!   ("executor shut down").
//!
//! Every report is retried until the command service answers; repeats are idempotent.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use crate::agent::Shared;
use crate::client::{ClientError, Failure, Utilisation};
use crate::progress::{self, Pending};
use crate::wire::{LogBatch, LogLine, MAX_LINE_BYTES};

/// Why a run is being stopped from outside.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// Its job was cancelled.
    Cancel,
    /// The executor shuts down and the drain grace is over.
    Shutdown,
    /// The command service refused a report: the run is no longer this executor's.
    Refused(String),
}

/// GPU time of a run, accumulated from every telemetry sample while it runs.
#[derive(Debug, Default)]
pub struct UtilisationAcc {
    pub started: Option<Instant>,
    pub last_sample: Option<Instant>,
    pub sampled: f64,
    pub busy: f64,
    pub peak_memory_mb: Option<u64>,
}

impl UtilisationAcc {
    /// Adds one telemetry round: `samples` = (utilisation 0..=1, memory used) of each of the
    /// run's GPUs, taken at `now`.
    pub fn add(&mut self, now: Instant, samples: &[(f64, u64)]) {
        let Some(started) = self.started else {
            return;
        };
        let since = self.last_sample.unwrap_or(started);
        let dt = now.saturating_duration_since(since).as_secs_f64();
        self.last_sample = Some(now);
        for &(utilisation, memory) in samples {
            self.sampled += dt;
            self.busy += dt * utilisation.clamp(0.0, 1.0);
            self.peak_memory_mb = Some(self.peak_memory_mb.unwrap_or(0).max(memory));
        }
    }

    pub fn report(&self) -> Option<Utilisation> {
        (self.sampled > 0.0).then(|| Utilisation {
            gpu_seconds_sampled: self.sampled,
            gpu_seconds_busy: self.busy.min(self.sampled),
            peak_memory_mb: self.peak_memory_mb,
        })
    }
}

/// What the executor remembers of a run on disk (`<work-dir>/<run_id>/run.json`), so a
/// restart knows which runs it had accepted and which processes it had started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub job_id: Uuid,
    pub run_id: Uuid,
    pub gpu_uuids: Vec<String>,
    #[serde(flatten)]
    pub state: RecordState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RecordState {
    /// The assignment was acknowledged; no process yet.
    Accepted,
    /// The process (group leader) was started.
    Running { pid: i32 },
    /// Ended and reported (or nothing left to report).
    Done,
}

pub const RECORD_FILE: &str = "run.json";

pub fn run_dir(work_dir: &Path, run_id: Uuid) -> PathBuf {
    work_dir.join(run_id.to_string())
}

/// Written to a temporary file and renamed: a crash leaves the old record or the new one.
pub fn write_record(work_dir: &Path, record: &RunRecord) -> std::io::Result<()> {
    let dir = run_dir(work_dir, record.run_id);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(".run.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(record).expect("serializable"),
    )?;
    std::fs::rename(tmp, dir.join(RECORD_FILE))
}

pub fn read_record(dir: &Path) -> Option<RunRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD_FILE)).ok()?).ok()
}

/// Whether `pid` is alive and is the process this executor started for `run_id` (checked by
/// the `OVERFLY_RUN_ID` in its environment, so a reused pid is never killed).
pub fn is_our_process(pid: i32, run_id: Uuid) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("OVERFLY_RUN_ID={run_id}");
    environ
        .split(|&b| b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// SIGKILL to a whole process group; a group that is gone already is fine.
pub fn kill_group(pgid: i32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// The control side of a running run, kept by the agent.
pub struct RunControl {
    pub job_id: Uuid,
    pub gpu_indexes: Vec<u32>,
    pub stop: Arc<watch::Sender<Option<Stop>>>,
    pub utilisation: Arc<Mutex<UtilisationAcc>>,
}

enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    Stopped(Stop, ExitStatus),
}

fn describe_signal(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| format!("{} ({signal})", s.as_str()))
        .unwrap_or_else(|_| signal.to_string())
}

/// Runs one assigned run to its end and reports it. `record` is already on disk as
/// `Accepted`; the agent registered `control` under the run id before calling this.
pub async fn execute(
    shared: Arc<Shared>,
    record: RunRecord,
    mut stop_rx: watch::Receiver<Option<Stop>>,
    stop: Arc<watch::Sender<Option<Stop>>>,
    utilisation: Arc<Mutex<UtilisationAcc>>,
    gpu_indexes: Vec<u32>,
) {
    let job_id = record.job_id;
    let run_id = record.run_id;
    let client = &shared.client;
    let done = |shared: &Shared| {
        let mut record = record.clone();
        record.state = RecordState::Done;
        if let Err(e) = write_record(&shared.work_dir, &record) {
            tracing::error!(%run_id, error = %e, "cannot write the run's record");
        }
    };
    let refused_or_log = |what: &str, result: Result<serde_json::Value, ClientError>| {
        if let Err(error) = result {
            tracing::warn!(%job_id, %run_id, %error, "{what} report not recorded");
        }
    };

    // Before the process exists: the run failed (nothing ran, no utilisation); finish it.
    let fail_before_start = async |reason: String, retryable: bool| {
        let failure = Failure {
            exit_code: None,
            signal: None,
            reason,
            retryable,
        };
        refused_or_log(
            "failed",
            client.failed(job_id, run_id, &failure, None).await,
        );
        done(&shared);
    };

    // A cancel may already have arrived (the cancel consumer runs beside the assignments').
    if shared.cancelled.lock().unwrap().contains(&run_id) {
        tracing::info!(%job_id, %run_id, "run was cancelled before it started");
        done(&shared);
        return;
    }

    let spec = match client.job_spec(job_id).await {
        Ok(spec) => spec,
        Err(error) => {
            tracing::error!(%job_id, %run_id, %error, "cannot read the job's spec");
            let reason = format!("executor could not read the job's spec: {error}");
            fail_before_start(reason, true).await;
            return;
        }
    };
    if gpu_indexes.len() != record.gpu_uuids.len() {
        let reason = format!(
            "executor {} has not all of the GPUs {:?}",
            shared.config.executor_id, record.gpu_uuids
        );
        fail_before_start(reason, true).await;
        return;
    }

    let dir = run_dir(&shared.work_dir, run_id);
    let visible = gpu_indexes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let Some((program, args)) = spec.command.split_first() else {
        fail_before_start("the job has an empty command".into(), false).await;
        return;
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(&dir)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("NVIDIA_VISIBLE_DEVICES")
        .envs(&spec.env)
        // NVML numbers GPUs in PCI bus order; make CUDA use the same order.
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("CUDA_VISIBLE_DEVICES", &visible)
        .env("OVERFLY_JOB_ID", job_id.to_string())
        .env("OVERFLY_RUN_ID", run_id.to_string())
        .env("OVERFLY_EXECUTOR_ID", &shared.config.executor_id)
        .env("OVERFLY_WORK_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            tracing::warn!(%job_id, %run_id, %program, %error, "cannot start the workload");
            fail_before_start(format!("cannot start {program:?}: {error}"), false).await;
            return;
        }
    };
    let pid = child.id().expect("a just-spawned child has a pid") as i32;
    let mut running = record.clone();
    running.state = RecordState::Running { pid };
    if let Err(e) = write_record(&shared.work_dir, &running) {
        tracing::error!(%run_id, error = %e, "cannot write the run's record");
    }
    tracing::info!(%job_id, %run_id, pid, cuda_visible_devices = %visible, ?spec.command, "workload started");
    for &index in &gpu_indexes {
        shared.backend.set_busy(index, true);
    }

    // Output: both pipes read line by line into the log shipper and the progress state.
    let pending = Arc::new(Mutex::new(Pending::default()));
    let progress_ready = Arc::new(Notify::new());
    let (log_tx, log_rx) = mpsc::channel::<(&'static str, String)>(10_000);
    let shipper = tokio::spawn(ship_logs(
        shared.js.clone(),
        shared.config.executor_id.clone(),
        job_id,
        run_id,
        log_rx,
    ));
    let readers = [
        tokio::spawn(read_lines(
            child.stdout.take().expect("piped"),
            "stdout",
            log_tx.clone(),
            Some((pending.clone(), progress_ready.clone())),
        )),
        tokio::spawn(read_lines(
            child.stderr.take().expect("piped"),
            "stderr",
            log_tx,
            None,
        )),
    ];

    // Started: only now is the run's process real. A refusal means the job was cancelled (or
    // the run ended elsewhere) in the meantime: stop the process, report nothing more.
    let started = client.started(job_id, run_id).await;
    utilisation.lock().unwrap().started = Some(Instant::now());
    let (finished_tx, finished_rx) = watch::channel(false);
    let mut reporter = None;
    match started {
        Ok(_) => {
            reporter = Some(tokio::spawn(report_progress(
                shared.clone(),
                job_id,
                run_id,
                pending.clone(),
                progress_ready.clone(),
                finished_rx,
                stop.clone(),
            )));
        }
        Err(error) => {
            tracing::info!(%job_id, %run_id, %error, "start refused; stopping the workload");
            stop.send_replace(Some(Stop::Refused(error.to_string())));
        }
    }

    let grace = shared.config.kill_grace();
    let timeout = Duration::from_secs(spec.timeout_s);
    let outcome = tokio::select! {
        status = child.wait() => Outcome::Exited(status.unwrap_or_else(|_| ExitStatus::from_raw(0xff00))),
        () = tokio::time::sleep(timeout) => {
            tracing::info!(%job_id, %run_id, timeout_s = spec.timeout_s, "timeout: stopping the process group");
            terminate(&mut child, pid, grace).await;
            Outcome::TimedOut
        }
        stop = wait_stop(&mut stop_rx) => {
            let grace = if matches!(stop, Stop::Refused(_)) { Duration::ZERO } else { grace };
            tracing::info!(%job_id, %run_id, ?stop, "stopping the process group");
            let status = terminate(&mut child, pid, grace).await;
            Outcome::Stopped(stop, status)
        }
    };
    // Whatever the leader left behind in its group goes with it.
    kill_group(pid, Signal::SIGKILL);
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    let _ = finished_tx.send(true);
    if let Some(reporter) = reporter {
        let _ = reporter.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), shipper).await;
    for &index in &gpu_indexes {
        shared.backend.set_busy(index, false);
    }
    let util = utilisation.lock().unwrap().report();

    // A refusal of a progress report may have come in while the process was ending.
    let refused = matches!(&*stop_rx.borrow(), Some(Stop::Refused(_)));
    match outcome {
        _ if refused => {}
        Outcome::Exited(status) if status.success() => {
            tracing::info!(%job_id, %run_id, "workload succeeded");
            refused_or_log("succeeded", client.succeeded(job_id, run_id, util).await);
        }
        Outcome::Exited(status) => {
            let failure = exit_failure(status);
            tracing::info!(%job_id, %run_id, reason = %failure.reason, "workload failed");
            refused_or_log(
                "failed",
                client.failed(job_id, run_id, &failure, util).await,
            );
        }
        Outcome::TimedOut => {
            refused_or_log("timed-out", client.timed_out(job_id, run_id, util).await);
        }
        // The job is cancelled already; the run's end says how the process was stopped (and
        // with its utilisation). The domain records it without retrying a cancelled job.
        Outcome::Stopped(Stop::Cancel, status) => {
            let how = match (status.code(), status.signal()) {
                (_, Some(signal)) => format!("killed by signal {}", describe_signal(signal)),
                (Some(code), _) => format!("exited with code {code}"),
                (None, None) => "ended".to_string(),
            };
            let failure = Failure {
                exit_code: status.code(),
                signal: status.signal(),
                reason: format!("cancelled: the process was stopped ({how})"),
                retryable: false,
            };
            tracing::info!(%job_id, %run_id, reason = %failure.reason, "cancelled run stopped");
            refused_or_log(
                "failed",
                client.failed(job_id, run_id, &failure, util).await,
            );
        }
        Outcome::Stopped(Stop::Refused(_), _) => {}
        Outcome::Stopped(Stop::Shutdown, status) => {
            let failure = Failure {
                exit_code: status.code(),
                signal: status.signal(),
                reason: "executor shut down".into(),
                retryable: true,
            };
            refused_or_log(
                "failed",
                client.failed(job_id, run_id, &failure, util).await,
            );
        }
    }
    done(&shared);
}

fn exit_failure(status: ExitStatus) -> Failure {
    match (status.code(), status.signal()) {
        (Some(code), _) => Failure {
            exit_code: Some(code),
            signal: None,
            reason: format!("exited with code {code}"),
            retryable: true,
        },
        (None, Some(signal)) => Failure {
            exit_code: None,
            signal: Some(signal),
            reason: format!("killed by signal {}", describe_signal(signal)),
            retryable: true,
        },
        (None, None) => Failure {
            exit_code: None,
            signal: None,
            reason: "ended without an exit status".into(),
            retryable: true,
        },
    }
}

async fn wait_stop(rx: &mut watch::Receiver<Option<Stop>>) -> Stop {
    loop {
        if let Some(stop) = rx.borrow_and_update().clone() {
            return stop;
        }
        if rx.changed().await.is_err() {
            // The agent dropped the sender: never stop from outside.
            std::future::pending::<()>().await;
        }
    }
}

/// SIGTERM to the group, SIGKILL after `grace`; returns the leader's exit status.
async fn terminate(child: &mut tokio::process::Child, pgid: i32, grace: Duration) -> ExitStatus {
    if !grace.is_zero() {
        kill_group(pgid, Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status.unwrap_or_else(|_| ExitStatus::from_raw(0xff00));
        }
    }
    kill_group(pgid, Signal::SIGKILL);
    child
        .wait()
        .await
        .unwrap_or_else(|_| ExitStatus::from_raw(0xff00))
}

async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    stream: &'static str,
    log: mpsc::Sender<(&'static str, String)>,
    progress: Option<(Arc<Mutex<Pending>>, Arc<Notify>)>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buffer = Vec::new();
    let mut dropped = 0u64;
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while buffer.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buffer.pop();
        }
        let mut line = String::from_utf8_lossy(&buffer).into_owned();
        if let Some((pending, ready)) = &progress
            && let Some(update) = progress::parse(&line)
        {
            pending.lock().unwrap().merge(update);
            ready.notify_one();
        }
        if line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        // Never block the workload on a slow log stream: drop and count instead.
        if log.try_send((stream, line)).is_err() {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(stream, dropped, "log lines dropped (log stream too slow)");
    }
}

/// Batches a run's lines (up to 500 lines or 250 ms) into `overfly.logs.<job>.<run>`.
async fn ship_logs(
    js: jetstream::Context,
    executor_id: String,
    job_id: Uuid,
    run_id: Uuid,
    mut rx: mpsc::Receiver<(&'static str, String)>,
) {
    let subject = overfly_schemas::subjects::log_subject(&job_id.to_string(), &run_id.to_string());
    let mut n = 0u64;
    let mut open = true;
    while open {
        let mut lines = Vec::new();
        match rx.recv().await {
            None => break,
            Some((stream, line)) => {
                n += 1;
                lines.push(LogLine {
                    n,
                    stream: stream.into(),
                    at: Utc::now(),
                    line,
                });
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        while lines.len() < 500 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((stream, line))) => {
                    n += 1;
                    lines.push(LogLine {
                        n,
                        stream: stream.into(),
                        at: Utc::now(),
                        line,
                    });
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let first = lines[0].n;
        let batch = LogBatch {
            executor_id: executor_id.clone(),
            job_id,
            run_id,
            lines,
        };
        let payload: bytes::Bytes = serde_json::to_vec(&batch).expect("serializable").into();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            overfly_schemas::subjects::headers::MSG_ID,
            format!("{run_id}:{first}").as_str(),
        );
        let mut published = false;
        for attempt in 1..=5u32 {
            let result = async {
                js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
                    .map_err(anyhow::Error::from)?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(3), result).await {
                Ok(Ok(())) => {
                    published = true;
                    break;
                }
                Ok(Err(e)) => tracing::debug!(attempt, error = %e, "log publish failed"),
                Err(_) => tracing::debug!(attempt, "log publish timed out"),
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        if !published {
            tracing::warn!(%run_id, first, "log batch lost: JetStream unavailable");
        }
    }
}

/// Sends progress at most every [`progress::MIN_INTERVAL`], merged; the last update before
/// the end is always sent. A refusal stops the run.
async fn report_progress(
    shared: Arc<Shared>,
    job_id: Uuid,
    run_id: Uuid,
    pending: Arc<Mutex<Pending>>,
    ready: Arc<Notify>,
    mut finished: watch::Receiver<bool>,
    stop: Arc<watch::Sender<Option<Stop>>>,
) {
    let mut report_seq = 0u64;
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut stopped = stop.subscribe();
    // Once the run is cancelled (or no longer ours) its progress is of no interest.
    let silenced = |stopped: &watch::Receiver<Option<Stop>>| {
        matches!(&*stopped.borrow(), Some(Stop::Cancel | Stop::Refused(_)))
    };
    loop {
        if silenced(&stopped) {
            return;
        }
        let is_finished = *finished.borrow_and_update();
        if pending.lock().unwrap().is_empty() {
            if is_finished {
                return;
            }
            tokio::select! {
                () = ready.notified() => {}
                _ = finished.changed() => {}
                _ = stopped.changed() => {}
            }
            continue;
        }
        if let Some(at) = last_sent {
            tokio::select! {
                () = tokio::time::sleep_until(at + progress::MIN_INTERVAL) => {}
                _ = stopped.changed() => continue,
            }
        }
        let Some(update) = pending.lock().unwrap().take() else {
            continue;
        };
        report_seq += 1;
        last_sent = Some(tokio::time::Instant::now());
        let attempts = crate::client::Attempts::AtMost(if is_finished { 20 } else { 5 });
        match shared
            .client
            .progress(
                job_id,
                run_id,
                report_seq,
                update.progress,
                &update.metrics,
                attempts,
            )
            .await
        {
            Ok(_) => {}
            Err(ClientError::Refused { status, body }) if status == 409 || status == 404 => {
                tracing::info!(%job_id, %run_id, %body, "progress refused: the run is no longer ours");
                stop.send_replace(Some(Stop::Refused(body)));
                return;
            }
            Err(error) => tracing::warn!(%job_id, %run_id, %error, "progress report dropped"),
        }
    }
}

/// Indexes of `uuids` in this host's inventory (only those found).
pub fn gpu_indexes(inventory: &HashMap<String, u32>, uuids: &[String]) -> Vec<u32> {
    uuids
        .iter()
        .filter_map(|uuid| inventory.get(uuid).copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilisation_sums_gpu_seconds_over_the_runs_gpus() {
        let t0 = Instant::now();
        let mut acc = UtilisationAcc {
            started: Some(t0),
            ..Default::default()
        };
        assert_eq!(acc.report(), None);
        acc.add(t0 + Duration::from_secs(1), &[(1.0, 1000), (0.5, 3000)]);
        acc.add(t0 + Duration::from_secs(3), &[(0.5, 2000), (0.0, 100)]);
        let u = acc.report().unwrap();
        assert!((u.gpu_seconds_sampled - 6.0).abs() < 1e-9, "{u:?}");
        assert!(
            (u.gpu_seconds_busy - (1.0 + 0.5 + 1.0)).abs() < 1e-9,
            "{u:?}"
        );
        assert_eq!(u.peak_memory_mb, Some(3000));
    }

    #[test]
    fn a_run_not_started_accumulates_nothing() {
        let mut acc = UtilisationAcc::default();
        acc.add(Instant::now(), &[(1.0, 10)]);
        assert_eq!(acc.report(), None);
    }

    #[test]
    fn exit_statuses_become_failures() {
        let code = exit_failure(ExitStatus::from_raw(3 << 8));
        assert_eq!(code.exit_code, Some(3));
        assert_eq!(code.reason, "exited with code 3");
        assert!(code.retryable);
        let signal = exit_failure(ExitStatus::from_raw(9));
        assert_eq!(signal.signal, Some(9));
        assert_eq!(signal.reason, "killed by signal SIGKILL (9)");
    }

    #[test]
    fn records_round_trip_through_the_work_dir() {
        let dir = tempfile::tempdir().unwrap();
        let record = RunRecord {
            job_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            gpu_uuids: vec!["GPU-1".into()],
            state: RecordState::Running { pid: 42 },
        };
        write_record(dir.path(), &record).unwrap();
        assert_eq!(
            read_record(&run_dir(dir.path(), record.run_id)),
            Some(record)
        );
    }

    #[test]
    fn a_pid_is_ours_only_with_our_run_id() {
        let me = std::process::id() as i32;
        assert!(!is_our_process(me, Uuid::new_v4()));
        assert!(!is_our_process(i32::MAX, Uuid::new_v4()));
    }
}
