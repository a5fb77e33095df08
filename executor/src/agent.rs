//! The executor agent: durable JetStream consumers for its assignments and cancellations,
//! registration and heartbeats, telemetry, the runs themselves, and the drain on shutdown.
//!
//! Start-up order matters: the consumers are created (delivering only new events the first
//! time) before the executor registers, so no assignment made after registration can be
//! missed; they are durable, so a restart resumes where the last process stopped.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use overfly_schemas::EventEnvelope;
use overfly_schemas::subjects;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::client::{ClientError, CommandClient, Failure};
use crate::config::Config;
use crate::gpu::{GpuBackend, GpuInfo};
use crate::run::{self, RecordState, RunControl, RunRecord, Stop, UtilisationAcc};
use crate::wire::TelemetrySample;

/// Everything the agent's tasks share.
pub struct Shared {
    pub config: Config,
    pub client: CommandClient,
    pub backend: Arc<dyn GpuBackend>,
    pub inventory: Vec<GpuInfo>,
    pub js: jetstream::Context,
    pub work_dir: PathBuf,
    /// Runs with a live task, by run id.
    pub runs: Mutex<HashMap<Uuid, RunControl>>,
    /// Notified whenever a run task ends.
    pub run_ended: Notify,
    /// Runs cancelled before (or while) their assignment was handled.
    pub cancelled: Mutex<HashSet<Uuid>>,
    pub draining: AtomicBool,
    hostname: String,
}

#[derive(Deserialize)]
struct RunAssigned {
    run_id: Uuid,
    executor_id: String,
    gpu_uuids: Vec<String>,
}

#[derive(Deserialize)]
struct JobCancelled {
    active_run: Option<Uuid>,
    active_executor: Option<String>,
}

/// Runs the executor until `shutdown` completes, then drains: stops taking work, lets running
/// work finish up to the drain grace, stops what remains (reported failed, retryable),
/// deregisters and returns.
pub async fn run(
    config: Config,
    backend: Box<dyn GpuBackend>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let backend: Arc<dyn GpuBackend> = Arc::from(backend);
    let inventory = backend.inventory().context("reading the GPU inventory")?;
    anyhow::ensure!(!inventory.is_empty(), "no GPUs found");
    for gpu in &inventory {
        tracing::info!(
            index = gpu.index, uuid = %gpu.uuid, name = %gpu.name,
            memory_mb = gpu.memory_total_mb, cc = %gpu.compute_capability,
            pci = %gpu.pci_bus_id, "GPU"
        );
    }
    let work_dir = config.work_dir();
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating the work dir {}", work_dir.display()))?;
    let nats = async_nats::ConnectOptions::new()
        .name(format!("overfly-executor-{}", config.executor_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(&config.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
    let js = jetstream::new(nats);
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| config.executor_id.clone());
    let shared = Arc::new(Shared {
        client: CommandClient::new(&config.command_url, &config.executor_id),
        backend,
        inventory,
        js,
        work_dir,
        runs: Mutex::default(),
        run_ended: Notify::new(),
        cancelled: Mutex::default(),
        draining: AtomicBool::new(false),
        hostname,
        config,
    });

    // 1. Consumers first (new events only on first creation), then everything else.
    let assignments = consumer_for(
        &shared,
        &subjects::executor_assignments_consumer(&shared.config.executor_id),
        "RunAssigned",
    )
    .await?;
    let cancellations = consumer_for(
        &shared,
        &subjects::executor_cancellations_consumer(&shared.config.executor_id),
        "JobCancelled",
    )
    .await?;
    ensure_streams(&shared.js).await;

    // 2. Runs this executor had before a restart.
    recover(&shared).await;

    // 3. Register; heartbeats keep the lease.
    register(&shared).await?;
    let heartbeats = AbortOnDrop(tokio::spawn(heartbeat_loop(shared.clone())));
    let _telemetry = AbortOnDrop(tokio::spawn(telemetry_loop(shared.clone())));
    let _assignments = AbortOnDrop(tokio::spawn(consume(
        shared.clone(),
        assignments,
        handle_assignment,
    )));
    let _cancellations = AbortOnDrop(tokio::spawn(consume(
        shared.clone(),
        cancellations,
        handle_cancellation,
    )));
    tracing::info!(executor_id = %shared.config.executor_id, "executor ready");

    shutdown.await;
    drain(&shared, hurry).await;
    drop(heartbeats);
    match shared.client.deregister("executor shut down").await {
        Ok(_) => tracing::info!("deregistered"),
        Err(error) => tracing::warn!(%error, "deregister failed"),
    }
    Ok(())
}

async fn drain(shared: &Arc<Shared>, hurry: impl Future<Output = ()>) {
    shared.draining.store(true, Ordering::SeqCst);
    let running = shared.runs.lock().unwrap().len();
    tracing::info!(running, grace_s = shared.config.drain_grace_s, "draining");
    if let Err(error) = shared
        .client
        .drain("executor shutting down (SIGTERM)")
        .await
    {
        tracing::warn!(%error, "drain not recorded");
    }
    let grace = Duration::from_secs(shared.config.drain_grace_s);
    tokio::select! {
        () = wait_for_no_runs(shared) => {}
        () = tokio::time::sleep(grace) => tracing::info!("drain grace is over"),
        () = hurry => tracing::info!("asked again: not waiting for running work"),
    }
    let stopping: Vec<_> = shared
        .runs
        .lock()
        .unwrap()
        .values()
        .map(|c| c.stop.clone())
        .collect();
    if !stopping.is_empty() {
        tracing::info!(runs = stopping.len(), "stopping what still runs");
    }
    for stop in stopping {
        stop.send_replace(Some(Stop::Shutdown));
    }
    let bound = shared.config.kill_grace() + Duration::from_secs(60);
    if tokio::time::timeout(bound, wait_for_no_runs(shared))
        .await
        .is_err()
    {
        tracing::error!("runs did not end in time; leaving");
    }
}

async fn wait_for_no_runs(shared: &Shared) {
    loop {
        let ended = shared.run_ended.notified();
        if shared.runs.lock().unwrap().is_empty() {
            return;
        }
        ended.await;
    }
}

/// The executor's durable consumer of one job event type. Waits for the events stream (the
/// command service's relay creates it).
async fn consumer_for(
    shared: &Shared,
    name: &str,
    event_type: &str,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let mut logged = false;
    loop {
        match try_consumer(shared, name, event_type).await {
            Ok(consumer) => return Ok(consumer),
            Err(error) => {
                if !logged {
                    tracing::warn!(%error, stream = %shared.config.events_stream, "waiting for the events stream");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn try_consumer(
    shared: &Shared,
    name: &str,
    event_type: &str,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let stream = shared
        .js
        .get_stream(&shared.config.events_stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {}: {e}", shared.config.events_stream))?;
    if let Ok(existing) = stream.get_consumer(name).await {
        tracing::info!(consumer = name, "resuming durable consumer");
        return Ok(existing);
    }
    let created = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: subjects::job_events_of_type(event_type),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating consumer {name}: {e}"))?;
    tracing::info!(
        consumer = name,
        "created durable consumer (new events only)"
    );
    Ok(created)
}

/// The log and telemetry streams, created if missing (bounded retention).
async fn ensure_streams(js: &jetstream::Context) {
    for (name, subject, max_age_s, storage) in [
        (
            subjects::LOGS_STREAM,
            subjects::LOGS_ALL,
            subjects::LOGS_MAX_AGE_S,
            stream::StorageType::File,
        ),
        (
            subjects::TELEMETRY_STREAM,
            subjects::TELEMETRY_ALL,
            subjects::TELEMETRY_MAX_AGE_S,
            stream::StorageType::File,
        ),
    ] {
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            storage,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(max_age_s),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        if let Err(error) = js.get_or_create_stream(config).await {
            tracing::warn!(stream = name, %error, "cannot create the stream; logs/telemetry will be lost until it exists");
        }
    }
}

async fn register(shared: &Shared) -> anyhow::Result<()> {
    let accepted = shared
        .client
        .register(&shared.hostname, &shared.inventory, shared.config.lease_s)
        .await
        .map_err(|e| anyhow::anyhow!("registering: {e}"))?;
    tracing::info!(%accepted, "registered");
    // The first heartbeat activates the executor.
    if let Err(error) = shared.client.heartbeat().await {
        tracing::warn!(%error, "first heartbeat failed");
    }
    Ok(())
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match shared.client.heartbeat().await {
            Ok(_) => {}
            Err(ClientError::Refused { status, body }) if status == 404 || status == 409 => {
                // Marked lost (or never known): register again, as a new session.
                tracing::warn!(%body, "heartbeat refused; registering again");
                if let Err(error) = register(&shared).await {
                    tracing::error!(%error, "re-registration failed");
                }
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
    }
}

/// Samples every GPU each interval, publishes the samples, and adds them to the GPU time of
/// the runs holding those GPUs.
async fn telemetry_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        shared.config.telemetry_interval_ms.max(50),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u64;
    loop {
        tick.tick().await;
        let samples = match shared.backend.sample() {
            Ok(samples) => samples,
            Err(error) => {
                tracing::warn!(%error, "GPU sampling failed");
                continue;
            }
        };
        let now = Instant::now();
        let at = chrono::Utc::now();
        let by_index: HashMap<u32, (f64, u64)> = samples
            .iter()
            .map(|s| (s.index, (s.utilisation, s.memory_used_mb)))
            .collect();
        let mut holder: HashMap<u32, (Uuid, Uuid)> = HashMap::new();
        for (run_id, control) in shared.runs.lock().unwrap().iter() {
            let mine: Vec<(f64, u64)> = control
                .gpu_indexes
                .iter()
                .filter_map(|i| by_index.get(i).copied())
                .collect();
            control.utilisation.lock().unwrap().add(now, &mine);
            for &i in &control.gpu_indexes {
                holder.insert(i, (*run_id, control.job_id));
            }
        }
        let mut acks = Vec::with_capacity(samples.len());
        for sample in samples {
            let subject = subjects::telemetry_subject(&shared.config.executor_id, sample.index);
            let held = holder.get(&sample.index).copied();
            let message = TelemetrySample {
                executor_id: shared.config.executor_id.clone(),
                at,
                backend: shared.backend.kind().to_string(),
                run_id: held.map(|h| h.0),
                job_id: held.map(|h| h.1),
                gpu: sample,
            };
            let payload: bytes::Bytes = serde_json::to_vec(&message).expect("serializable").into();
            acks.push(shared.js.publish(subject, payload));
        }
        let published = tokio::time::timeout(Duration::from_secs(2), async {
            for ack in acks {
                ack.await?.await?;
            }
            anyhow::Ok(())
        })
        .await;
        if !matches!(published, Ok(Ok(()))) {
            failures += 1;
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(failures, "telemetry not published (JetStream unavailable?)");
            }
        }
    }
}

type Handler = fn(&Arc<Shared>, &EventEnvelope);

async fn consume(
    shared: Arc<Shared>,
    consumer: consumer::Consumer<consumer::pull::Config>,
    handle: Handler,
) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "consumer unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "consumer error");
                    continue;
                }
            };
            match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                Ok(envelope) => handle(&shared, &envelope),
                Err(error) => {
                    tracing::error!(subject = %message.subject, %error, "unreadable event; skipped")
                }
            }
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "ack failed; the event will be delivered again");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn payload<T: for<'de> Deserialize<'de>>(envelope: &EventEnvelope) -> Option<T> {
    let inner = envelope.payload.get(&envelope.event_type)?;
    match serde_json::from_value(inner.clone()) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(event = %envelope.event_type, %error, "unexpected event payload; skipped");
            None
        }
    }
}

fn handle_assignment(shared: &Arc<Shared>, envelope: &EventEnvelope) {
    if envelope.event_type != "RunAssigned" {
        return;
    }
    let Some(assigned) = payload::<RunAssigned>(envelope) else {
        return;
    };
    if assigned.executor_id != shared.config.executor_id {
        return;
    }
    let Ok(job_id) = envelope.aggregate_id.parse::<Uuid>() else {
        return;
    };
    let dir = run::run_dir(&shared.work_dir, assigned.run_id);
    if dir.join(run::RECORD_FILE).exists() {
        tracing::debug!(run_id = %assigned.run_id, "assignment seen before");
        return;
    }
    let record = RunRecord {
        job_id,
        run_id: assigned.run_id,
        gpu_uuids: assigned.gpu_uuids,
        state: RecordState::Accepted,
    };
    if let Err(error) = run::write_record(&shared.work_dir, &record) {
        tracing::error!(%error, run_id = %record.run_id, "cannot record the assignment");
    }
    tracing::info!(%job_id, run_id = %record.run_id, gpus = ?record.gpu_uuids, "run assigned");
    start_run(shared, record);
}

fn start_run(shared: &Arc<Shared>, record: RunRecord) {
    if shared.draining.load(Ordering::SeqCst) {
        let shared = shared.clone();
        tokio::spawn(async move {
            let failure = Failure {
                exit_code: None,
                signal: None,
                reason: "executor is draining".into(),
                retryable: true,
            };
            if let Err(error) = shared
                .client
                .failed(record.job_id, record.run_id, &failure, None)
                .await
            {
                tracing::warn!(%error, "failed report not recorded");
            }
            let mut record = record;
            record.state = RecordState::Done;
            let _ = run::write_record(&shared.work_dir, &record);
        });
        return;
    }
    let index_of: HashMap<String, u32> = shared
        .inventory
        .iter()
        .map(|g| (g.uuid.clone(), g.index))
        .collect();
    let gpu_indexes = run::gpu_indexes(&index_of, &record.gpu_uuids);
    let (stop_tx, stop_rx) = watch::channel(None);
    let stop = Arc::new(stop_tx);
    let utilisation = Arc::new(Mutex::new(UtilisationAcc::default()));
    let run_id = record.run_id;
    shared.runs.lock().unwrap().insert(
        run_id,
        RunControl {
            job_id: record.job_id,
            gpu_indexes: gpu_indexes.clone(),
            stop: stop.clone(),
            utilisation: utilisation.clone(),
        },
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        run::execute(
            shared.clone(),
            record,
            stop_rx,
            stop,
            utilisation,
            gpu_indexes,
        )
        .await;
        shared.runs.lock().unwrap().remove(&run_id);
        shared.run_ended.notify_waiters();
    });
}

fn handle_cancellation(shared: &Arc<Shared>, envelope: &EventEnvelope) {
    if envelope.event_type != "JobCancelled" {
        return;
    }
    let Some(cancelled) = payload::<JobCancelled>(envelope) else {
        return;
    };
    if cancelled.active_executor.as_deref() != Some(shared.config.executor_id.as_str()) {
        return;
    }
    let Some(run_id) = cancelled.active_run else {
        return;
    };
    tracing::info!(job_id = %envelope.aggregate_id, %run_id, "run cancelled");
    shared.cancelled.lock().unwrap().insert(run_id);
    if let Some(control) = shared.runs.lock().unwrap().get(&run_id) {
        control.stop.send_replace(Some(Stop::Cancel));
    }
}

/// Runs recorded in the work dir by an earlier process: an accepted run that never started is
/// started now; a run whose process was started is stopped (its process group killed if it
/// still lives) and reported failed, retryable — its output and GPU time are lost.
async fn recover(shared: &Arc<Shared>) {
    let Ok(entries) = std::fs::read_dir(&shared.work_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(mut record) = run::read_record(&entry.path()) else {
            continue;
        };
        match record.state {
            RecordState::Done => {
                // Finished runs' directories are kept a week for inspection.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(7 * 24 * 3600));
                if old {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            RecordState::Accepted => {
                tracing::info!(run_id = %record.run_id, "starting a run accepted before the restart");
                start_run(shared, record);
            }
            RecordState::Running { pid } => {
                if run::is_our_process(pid, record.run_id) {
                    tracing::warn!(run_id = %record.run_id, pid, "killing a workload left by the previous executor process");
                    run::kill_group(pid, nix::sys::signal::Signal::SIGKILL);
                }
                let failure = Failure {
                    exit_code: None,
                    signal: None,
                    reason: "executor restarted while the run was running".into(),
                    retryable: true,
                };
                match shared
                    .client
                    .failed(record.job_id, record.run_id, &failure, None)
                    .await
                {
                    Ok(_) | Err(ClientError::Refused { .. }) => {}
                    Err(error) => tracing::warn!(%error, "failed report not recorded"),
                }
                record.state = RecordState::Done;
                let _ = run::write_record(&shared.work_dir, &record);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
