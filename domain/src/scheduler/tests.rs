//! The policy's rules one by one, then properties over random queues and fleets, then
//! simulations over time (fair share converges, nothing starves).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn job(n: u128, account: &str, priority: u8, gpus: u8, queued_at: i64) -> QueuedJob {
    QueuedJob {
        job_id: id(n),
        account: account.to_string(),
        priority,
        gpus,
        gpu_memory_mb: 0,
        queued_at: t(queued_at),
        eligible_at: None,
    }
}

fn executor(name: &str, gpus: usize, memory_mb: u64) -> ExecutorView {
    ExecutorView {
        executor_id: name.to_string(),
        availability: ExecutorAvailability::Active,
        gpus: (0..gpus)
            .map(|i| GpuView {
                uuid: format!("{name}-gpu{i}"),
                index: i as u32,
                memory_mb,
                busy: false,
            })
            .collect(),
    }
}

fn snapshot(queue: Vec<QueuedJob>, executors: Vec<ExecutorView>) -> Snapshot {
    Snapshot {
        queue,
        executors,
        usage: BTreeMap::new(),
    }
}

fn placed(assignments: &[Assignment]) -> Vec<Uuid> {
    assignments.iter().map(|a| a.job_id).collect()
}

const POLICY: Policy = Policy {
    age_bonus: 50.0,
    age_horizon_s: 3600.0,
    usage_half_life_s: 3600.0,
};

#[test]
fn higher_priority_goes_first() {
    let s = snapshot(
        vec![job(1, "a", 10, 1, 0), job(2, "a", 90, 1, 10)],
        vec![executor("h", 1, 80_000)],
    );
    let assignments = schedule(&s, t(20), &POLICY);
    assert_eq!(placed(&assignments), [id(2)]);
    assert_eq!(assignments[0].decision.priority, 90);
    assert_eq!(assignments[0].gpu_uuids, ["h-gpu0"]);
}

#[test]
fn among_equal_priorities_the_account_with_less_recent_gpu_time_goes_first() {
    let mut s = snapshot(
        vec![job(1, "heavy", 50, 1, 0), job(2, "light", 50, 1, 10)],
        vec![executor("h", 1, 80_000)],
    );
    s.usage.insert("heavy".into(), 36_000.0);
    s.usage.insert("light".into(), 3_600.0);
    let assignments = schedule(&s, t(20), &POLICY);
    assert_eq!(placed(&assignments), [id(2)]);
    let decision = &assignments[0].decision;
    // mean = 19,800: light = 1 / (1 + 3600/19800).
    assert!((decision.fair_share_factor - 1.0 / (1.0 + 3_600.0 / 19_800.0)).abs() < 1e-12);
    assert_eq!(decision.overtook, Vec::<Uuid>::new());
}

#[test]
fn among_equals_the_older_job_goes_first_and_waiting_raises_priority() {
    let s = snapshot(
        vec![job(1, "a", 50, 1, 100), job(2, "a", 50, 1, 0)],
        vec![executor("h", 1, 80_000)],
    );
    assert_eq!(placed(&schedule(&s, t(200), &POLICY)), [id(2)]);
    // Half the horizon (+25 points) lifts a priority-40 job over a fresh 60.
    let s = snapshot(
        vec![job(1, "a", 60, 1, 1800), job(2, "a", 40, 1, 0)],
        vec![executor("h", 1, 80_000)],
    );
    let order = queue_order(&s, t(1800), &POLICY);
    assert_eq!(order[0].0, id(2));
    assert_eq!(order[0].1.effective_priority, 65.0);
    assert!((order[0].1.age_factor - 0.5).abs() < 1e-12);
    assert_eq!(order[1].1.effective_priority, 60.0);
}

#[test]
fn a_multi_gpu_job_is_placed_on_one_executor_with_enough_memory() {
    let mut small = executor("small", 4, 40_000);
    small.gpus[0].busy = true;
    let s = snapshot(
        vec![QueuedJob {
            gpu_memory_mb: 40_000,
            ..job(1, "a", 50, 4, 0)
        }],
        vec![small, executor("big", 8, 80_000)],
    );
    let assignments = schedule(&s, t(1), &POLICY);
    assert_eq!(assignments.len(), 1);
    assert_eq!(assignments[0].executor_id, "big");
    assert_eq!(assignments[0].gpu_uuids.len(), 4);
    // 80 GB asked: the 40 GB GPUs never fit.
    let s = snapshot(
        vec![QueuedJob {
            gpu_memory_mb: 80_000,
            ..job(1, "a", 50, 1, 0)
        }],
        vec![executor("small", 4, 40_000)],
    );
    assert!(schedule(&s, t(1), &POLICY).is_empty());
    let why = explain(&s, id(1), t(1), &POLICY).unwrap();
    assert_eq!(
        why.waiting_for,
        [Blocker::NoExecutorCanFit {
            gpus: 1,
            gpu_memory_mb: 80_000,
            largest_fitting: 0
        }]
    );
}

#[test]
fn best_fit_keeps_the_large_hole_for_large_jobs() {
    let mut nearly_full = executor("a-nearly-full", 8, 80_000);
    for gpu in &mut nearly_full.gpus[..6] {
        gpu.busy = true;
    }
    let s = snapshot(
        vec![job(1, "a", 90, 1, 0), job(2, "a", 50, 8, 0)],
        vec![executor("b-empty", 8, 80_000), nearly_full],
    );
    let assignments = schedule(&s, t(1), &POLICY);
    assert_eq!(placed(&assignments), [id(1), id(2)]);
    assert_eq!(assignments[0].executor_id, "a-nearly-full");
    assert_eq!(assignments[0].gpu_uuids, ["a-nearly-full-gpu6"]);
    assert_eq!(assignments[1].executor_id, "b-empty");
}

#[test]
fn busy_gpus_and_unavailable_executors_are_never_used() {
    let mut draining = executor("draining", 4, 80_000);
    draining.availability = ExecutorAvailability::Unavailable;
    let mut busy = executor("busy", 2, 80_000);
    busy.gpus[1].busy = true;
    let s = snapshot(
        vec![job(1, "a", 50, 1, 0), job(2, "a", 50, 1, 1)],
        vec![draining, busy],
    );
    let assignments = schedule(&s, t(5), &POLICY);
    assert_eq!(placed(&assignments), [id(1)]);
    assert_eq!(assignments[0].gpu_uuids, ["busy-gpu0"]);
    let why = explain(&s, id(2), t(5), &POLICY).unwrap();
    assert_eq!(why.position, 2);
    assert_eq!(why.ahead, [id(1)]);
    assert_eq!(
        why.waiting_for,
        [Blocker::GpusBusy {
            executors: vec!["busy".into()]
        }]
    );
}

#[test]
fn a_job_in_backoff_waits_and_says_until_when() {
    let s = snapshot(
        vec![QueuedJob {
            eligible_at: Some(t(60)),
            ..job(1, "a", 50, 1, 0)
        }],
        vec![executor("h", 1, 80_000)],
    );
    assert!(schedule(&s, t(30), &POLICY).is_empty());
    let why = explain(&s, id(1), t(30), &POLICY).unwrap();
    assert_eq!(why.waiting_for, [Blocker::Backoff { until: t(60) }]);
    assert_eq!(why.factors.age_factor, 0.0);
    assert_eq!(placed(&schedule(&s, t(60), &POLICY)), [id(1)]);
    assert!(explain(&s, id(9), t(60), &POLICY).is_none());
}

#[test]
fn a_job_placed_past_one_that_does_not_fit_records_what_it_overtook() {
    let s = snapshot(
        vec![job(1, "a", 90, 4, 0), job(2, "b", 10, 1, 0)],
        vec![executor("h", 2, 80_000)],
    );
    let assignments = schedule(&s, t(10), &POLICY);
    assert_eq!(placed(&assignments), [id(2)]);
    assert_eq!(assignments[0].decision.overtook, [id(1)]);
    assert!(
        assignments[0]
            .decision
            .placement
            .contains("h: 1 of its 2 free GPUs")
    );
}

#[test]
fn a_starving_job_reserves_the_executors_that_can_host_it() {
    let mut h = executor("h", 4, 80_000);
    h.gpus[0].busy = true;
    let s = snapshot(
        vec![job(1, "a", 0, 4, 0), job(2, "b", 100, 1, 3500)],
        vec![h, executor("other", 2, 80_000)],
    );
    // Not starving yet: the small job backfills on the best fit.
    let before = schedule(&s, t(3599), &POLICY);
    assert_eq!(placed(&before), [id(2)]);
    // Starving: it goes first, and nothing else may take the GPUs of "h" ("other" is fine).
    let after = schedule(&s, t(3600), &POLICY);
    assert_eq!(placed(&after), [id(2)]);
    assert_eq!(after[0].executor_id, "other");
    let why = explain(&s, id(1), t(3600), &POLICY).unwrap();
    assert_eq!(why.position, 1);
    assert!(why.factors.starving);
    assert!(why.factors.score > 1000.0);
    let small = explain(&s, id(2), t(3600), &POLICY).unwrap();
    assert_eq!(small.would_assign.unwrap().executor_id, "other");
}

#[test]
fn decayed_usage_halves_every_half_life() {
    let recent = decayed_gpu_seconds(2, t(0), t(600), t(600), 3600.0);
    let older = decayed_gpu_seconds(2, t(0), t(600), t(4200), 3600.0);
    assert!((older / recent - 0.5).abs() < 1e-9, "{recent} {older}");
    // 2 GPUs × ∫ 2^(-age/h) over the last 600 s = 2 × h/ln2 × (1 − 2^(−600/h)).
    let expected = 2.0 * 3600.0 / std::f64::consts::LN_2 * (1.0 - 2f64.powf(-600.0 / 3600.0));
    assert!((recent - expected).abs() < 1e-6, "{recent} vs {expected}");
    assert!(
        recent < 1200.0,
        "decay counts less than plain GPU-seconds: {recent}"
    );
    // A running run (end in the future) counts up to now; nothing before it starts.
    assert_eq!(
        decayed_gpu_seconds(1, t(0), t(10_000), t(600), 3600.0),
        decayed_gpu_seconds(1, t(0), t(600), t(600), 3600.0)
    );
    assert_eq!(decayed_gpu_seconds(1, t(600), t(900), t(300), 3600.0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Properties over random queues and fleets
// ---------------------------------------------------------------------------------------------

const MEMORY: [u64; 3] = [24_000, 40_000, 80_000];
const ASKED_MEMORY: [u64; 4] = [0, 20_000, 40_000, 80_000];

fn arb_executor(n: usize) -> impl Strategy<Value = ExecutorView> {
    (
        prop::collection::vec((0..3usize, any::<bool>()), 1..=8),
        prop::bool::weighted(0.85),
    )
        .prop_map(move |(gpus, active)| ExecutorView {
            executor_id: format!("host-{n}"),
            availability: if active {
                ExecutorAvailability::Active
            } else {
                ExecutorAvailability::Unavailable
            },
            gpus: gpus
                .into_iter()
                .enumerate()
                .map(|(i, (memory, busy))| GpuView {
                    uuid: format!("host-{n}-gpu{i}"),
                    index: i as u32,
                    memory_mb: MEMORY[memory],
                    busy,
                })
                .collect(),
        })
}

fn arb_fleet() -> impl Strategy<Value = Vec<ExecutorView>> {
    (1..=4usize).prop_flat_map(|n| (0..n).map(arb_executor).collect::<Vec<_>>())
}

fn arb_queue() -> impl Strategy<Value = Vec<QueuedJob>> {
    prop::collection::vec(
        (
            0..3usize,
            0..=100u8,
            prop::sample::select(vec![1u8, 1, 1, 2, 4, 8]),
            0..4usize,
            0..7200i64,
            prop::option::weighted(0.2, 0..7200i64),
        ),
        0..30,
    )
    .prop_map(|jobs| {
        jobs.into_iter()
            .enumerate()
            .map(
                |(n, (account, priority, gpus, memory, queued, eligible))| QueuedJob {
                    job_id: id(n as u128 + 1),
                    account: ["geo", "vision", "nlp"][account].to_string(),
                    priority,
                    gpus,
                    gpu_memory_mb: ASKED_MEMORY[memory],
                    queued_at: t(queued),
                    eligible_at: eligible.map(t),
                },
            )
            .collect()
    })
}

fn arb_usage() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::vec(0.0..100_000.0f64, 3).prop_map(|usage| {
        ["geo", "vision", "nlp"]
            .into_iter()
            .map(String::from)
            .zip(usage)
            .collect()
    })
}

/// An independent, naive check: can `job` go on `executor` given the GPUs taken so far?
fn fits_naively(executor: &ExecutorView, taken: &BTreeSet<String>, job: &QueuedJob) -> bool {
    executor.availability == ExecutorAvailability::Active
        && executor
            .gpus
            .iter()
            .filter(|g| !g.busy && !taken.contains(&g.uuid) && g.memory_mb >= job.gpu_memory_mb)
            .count()
            >= usize::from(job.gpus)
}

fn could_ever_host(executor: &ExecutorView, job: &QueuedJob) -> bool {
    executor.availability == ExecutorAvailability::Active
        && executor
            .gpus
            .iter()
            .filter(|g| g.memory_mb >= job.gpu_memory_mb)
            .count()
            >= usize::from(job.gpus)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// No GPU is ever given twice, or while busy, or on an unavailable executor, or short of
    /// memory; a job gets exactly its GPU count, all on one executor, and only when eligible.
    #[test]
    fn no_gpu_is_ever_double_allocated(
        queue in arb_queue(),
        executors in arb_fleet(),
        usage in arb_usage(),
        now in 0..10_000i64,
    ) {
        let s = Snapshot { queue, executors, usage };
        let now = t(now);
        let assignments = schedule(&s, now, &POLICY);
        let mut seen = BTreeSet::new();
        let mut jobs = BTreeSet::new();
        for a in &assignments {
            prop_assert!(jobs.insert(a.job_id), "job placed twice");
            let job = s.queue.iter().find(|j| j.job_id == a.job_id).unwrap();
            prop_assert!(job.eligible_at.is_none_or(|e| e <= now));
            prop_assert_eq!(a.gpu_uuids.len(), usize::from(job.gpus));
            let executor = s.executors.iter().find(|e| e.executor_id == a.executor_id).unwrap();
            prop_assert_eq!(executor.availability, ExecutorAvailability::Active);
            for uuid in &a.gpu_uuids {
                prop_assert!(seen.insert(uuid.clone()), "GPU {} given twice", uuid);
                let gpu = executor.gpus.iter().find(|g| &g.uuid == uuid);
                prop_assert!(gpu.is_some(), "GPU {} not on {}", uuid, a.executor_id);
                let gpu = gpu.unwrap();
                prop_assert!(!gpu.busy);
                prop_assert!(gpu.memory_mb >= job.gpu_memory_mb);
            }
        }
    }

    /// Among jobs that fit, order is respected: a job ordered before a placed one was left
    /// out only because it did not fit in what the jobs before it left (or a starving job
    /// before it reserved the executors it fits on), or it is in backoff.
    #[test]
    fn priority_order_is_respected_among_fitting_jobs(
        queue in arb_queue(),
        executors in arb_fleet(),
        usage in arb_usage(),
        now in 0..10_000i64,
    ) {
        let s = Snapshot { queue, executors, usage };
        let now = t(now);
        let assignments = schedule(&s, now, &POLICY);
        let by_job: HashMap<Uuid, &Assignment> = assignments.iter().map(|a| (a.job_id, a)).collect();
        let order = queue_order(&s, now, &POLICY);
        // The order itself: effective priority never increases down the queue, except that
        // starving jobs come first.
        for pair in order.windows(2) {
            let (a, b) = (&pair[0].1, &pair[1].1);
            prop_assert!(a.starving >= b.starving);
            if !a.starving && !b.starving {
                prop_assert!(a.effective_priority >= b.effective_priority);
            }
        }
        let mut taken = BTreeSet::new();
        let mut reserved = BTreeSet::new();
        for (job_id, factors) in &order {
            let job = s.queue.iter().find(|j| j.job_id == *job_id).unwrap();
            if let Some(a) = by_job.get(job_id) {
                taken.extend(a.gpu_uuids.iter().cloned());
                continue;
            }
            if job.eligible_at.is_some_and(|e| e > now) {
                continue;
            }
            for executor in &s.executors {
                prop_assert!(
                    !fits_naively(executor, &taken, job) || reserved.contains(&executor.executor_id),
                    "{} fitted on {} but was left out", job_id, executor.executor_id
                );
            }
            if factors.starving {
                for executor in &s.executors {
                    if could_ever_host(executor, job) {
                        reserved.insert(executor.executor_id.clone());
                    }
                }
            }
        }
    }

    /// Explain agrees with schedule: a job explained as placeable is placed there, and one
    /// with blockers is not placed.
    #[test]
    fn explain_agrees_with_schedule(
        queue in arb_queue(),
        executors in arb_fleet(),
        now in 0..10_000i64,
    ) {
        let s = Snapshot { queue, executors, usage: BTreeMap::new() };
        let now = t(now);
        let assignments = schedule(&s, now, &POLICY);
        for job in &s.queue {
            let why = explain(&s, job.job_id, now, &POLICY).unwrap();
            let placed = assignments.iter().find(|a| a.job_id == job.job_id);
            prop_assert_eq!(why.would_assign.as_ref(), placed);
            prop_assert_eq!(why.waiting_for.is_empty(), placed.is_some());
            prop_assert_eq!(why.ahead.len() + 1, why.position);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulations over time
// ---------------------------------------------------------------------------------------------

/// (job, account, gpu uuids, start, end)
type Running = (Uuid, String, Vec<String>, DateTime<Utc>, DateTime<Utc>);
/// (job, account, gpus, start, end)
type Finished = (Uuid, String, u32, DateTime<Utc>, DateTime<Utc>);

/// A small discrete-time cluster: runs end after their duration, usage decays, the policy
/// places what it can every `tick` seconds.
struct Sim {
    executors: Vec<ExecutorView>,
    queue: Vec<QueuedJob>,
    runs: Vec<Running>,
    finished: Vec<Finished>,
    now: DateTime<Utc>,
}

impl Sim {
    fn new(executors: Vec<ExecutorView>) -> Self {
        Self {
            executors,
            queue: Vec::new(),
            runs: Vec::new(),
            finished: Vec::new(),
            now: t(0),
        }
    }

    fn usage(&self, policy: &Policy) -> BTreeMap<String, f64> {
        let mut usage = BTreeMap::new();
        let h = policy.usage_half_life_s;
        for (_, account, gpus, start, end) in &self.finished {
            *usage.entry(account.clone()).or_default() +=
                decayed_gpu_seconds(*gpus, *start, *end, self.now, h);
        }
        for (_, account, uuids, start, _) in &self.runs {
            *usage.entry(account.clone()).or_default() +=
                decayed_gpu_seconds(uuids.len() as u32, *start, self.now, self.now, h);
        }
        usage
    }

    /// Advances `tick` seconds: ends runs due, then schedules; returns what was placed.
    fn step(
        &mut self,
        tick: i64,
        duration: impl Fn(&QueuedJob) -> i64,
        policy: &Policy,
    ) -> Vec<Uuid> {
        self.now += Duration::seconds(tick);
        let now = self.now;
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.runs)
            .into_iter()
            .partition(|r| r.4 <= now);
        self.runs = running;
        for (job, account, uuids, start, end) in done {
            for e in &mut self.executors {
                for g in &mut e.gpus {
                    if uuids.contains(&g.uuid) {
                        g.busy = false;
                    }
                }
            }
            self.finished
                .push((job, account, uuids.len() as u32, start, end));
        }
        let snapshot = Snapshot {
            queue: self.queue.clone(),
            executors: self.executors.clone(),
            usage: self.usage(policy),
        };
        let assignments = schedule(&snapshot, now, policy);
        for a in &assignments {
            let position = self
                .queue
                .iter()
                .position(|j| j.job_id == a.job_id)
                .unwrap();
            let job = self.queue.remove(position);
            for e in &mut self.executors {
                for g in &mut e.gpus {
                    if a.gpu_uuids.contains(&g.uuid) {
                        assert!(!g.busy, "double allocation in the simulation");
                        g.busy = true;
                    }
                }
            }
            let end = now + Duration::seconds(duration(&job));
            self.runs.push((
                job.job_id,
                job.account.clone(),
                a.gpu_uuids.clone(),
                now,
                end,
            ));
        }
        placed(&assignments)
    }

    /// GPU-seconds each account ran in `[from, to)`.
    fn share(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> BTreeMap<String, f64> {
        let mut share = BTreeMap::new();
        let all = self
            .finished
            .iter()
            .map(|(_, a, g, s, e)| (a, *g, *s, *e))
            .chain(
                self.runs
                    .iter()
                    .map(|(_, a, u, s, _)| (a, u.len() as u32, *s, self.now)),
            );
        for (account, gpus, start, end) in all {
            let (start, end) = (start.max(from), end.min(to));
            if end > start {
                *share.entry(account.clone()).or_insert(0.0) +=
                    f64::from(gpus) * (end - start).num_seconds() as f64;
            }
        }
        share
    }
}

#[test]
fn fair_share_converges_to_equal_gpu_time_between_accounts() {
    // One account arrives with a week's heavy use behind it; three accounts keep the queue
    // full of equal-priority 1-GPU jobs of 10 minutes on 8 GPUs.
    let policy = Policy {
        age_bonus: 50.0,
        age_horizon_s: 30.0 * 86_400.0,
        usage_half_life_s: 3600.0,
    };
    let mut sim = Sim::new(vec![executor("h", 8, 80_000)]);
    // 8 GPUs for 12,500 s = 100,000 GPU-seconds, ending when the simulation starts.
    sim.finished
        .push((id(0), "geo".into(), 8, t(-12_500), t(0)));
    let accounts = ["geo", "vision", "nlp"];
    let mut next = 1u128;
    let mut early_geo = 0.0;
    for step in 0..(24 * 60) {
        for account in accounts {
            while sim.queue.iter().filter(|j| j.account == account).count() < 10 {
                sim.queue.push(job(next, account, 50, 1, 0));
                next += 1;
            }
        }
        sim.step(60, |_| 600, &policy);
        if step == 60 {
            early_geo = sim.share(t(0), sim.now).get("geo").copied().unwrap_or(0.0);
        }
    }
    // At first the heavy account waits for the others...
    let first_hour = sim.share(t(0), t(3660));
    assert!(early_geo < first_hour["vision"] * 0.5, "{first_hour:?}");
    // ...and over the last 12 hours the three got the same GPU time within 5%.
    let late = sim.share(sim.now - Duration::hours(12), sim.now);
    let total: f64 = late.values().sum();
    assert!(total > 0.95 * 8.0 * 12.0 * 3600.0, "GPUs idle: {late:?}");
    for account in accounts {
        let fraction = late[account] / total;
        assert!(
            (fraction - 1.0 / 3.0).abs() < 0.05,
            "{account}: {fraction} of {late:?}"
        );
    }
}

#[test]
fn a_low_priority_gang_job_is_not_starved_by_a_stream_of_small_high_priority_jobs() {
    let policy = POLICY; // one-hour horizon
    let mut sim = Sim::new(vec![executor("h", 8, 80_000)]);
    let big = id(1_000_000);
    sim.queue.push(QueuedJob {
        job_id: big,
        ..job(0, "geo", 0, 8, 0)
    });
    let mut next = 1u128;
    let mut placed_at = None;
    for _ in 0..(6 * 60) {
        // Always more 1-GPU priority-100 work than GPUs.
        while sim.queue.iter().filter(|j| j.gpus == 1).count() < 16 {
            let at = (sim.now - t(0)).num_seconds();
            sim.queue.push(job(next, "vision", 100, 1, at));
            next += 1;
        }
        if sim
            .step(60, |j| if j.gpus == 8 { 600 } else { 20 * 60 }, &policy)
            .contains(&big)
        {
            placed_at = Some(sim.now);
            break;
        }
    }
    let placed_at = placed_at.expect("the 8-GPU job starved");
    // Starving after the one-hour horizon, then the 20-minute runs drain (one tick slack).
    assert!(placed_at <= t(3600 + 20 * 60 + 60), "placed at {placed_at}");
    assert!(
        placed_at >= t(3600),
        "placed before it was starving: {placed_at}"
    );
}

// ---------------------------------------------------------------------------------------------
// The fold from events
// ---------------------------------------------------------------------------------------------

mod fold {
    use super::*;
    use crate::executor::{ExecutorEvent, GpuInfo};
    use crate::job::{JobEvent, JobSpec, RetryTrigger};

    fn spec(account: &str, gpus: u8) -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "tiles", "account": account, "submitted_by": "ana", "priority": 50,
            "gpus": gpus, "gpu_memory_mb": 0, "command": ["true"], "timeout_s": 60
        }))
        .unwrap()
    }

    fn registered(lease_s: u32, at: i64) -> ExecutorEvent {
        ExecutorEvent::ExecutorRegistered {
            executor_id: "h".into(),
            hostname: "h.example".into(),
            gpus: (0..2)
                .map(|i| GpuInfo {
                    uuid: format!("h-gpu{i}"),
                    index: i,
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_mb: 81_559,
                    compute_capability: "9.0".into(),
                })
                .collect(),
            lease_s,
            session: 1,
            at: t(at),
        }
    }

    fn submitted(n: u128, account: &str, gpus: u8, at: i64) -> JobEvent {
        JobEvent::JobSubmitted {
            job_id: id(n),
            spec: spec(account, gpus),
            at: t(at),
        }
    }

    fn assigned(run: u128, gpus: &[&str], at: i64) -> JobEvent {
        JobEvent::RunAssigned {
            run_id: id(run),
            attempt: 1,
            executor_id: "h".into(),
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            decision: Default::default(),
            at: t(at),
        }
    }

    #[test]
    fn the_fold_tracks_queue_gpus_usage_and_leases() {
        let mut state = FleetState::default();
        state.apply_executor("h", &registered(30, 0));
        // Registered but not active: nothing is placed on it yet.
        assert_eq!(
            state.snapshot(t(1), &POLICY).executors[0].availability,
            ExecutorAvailability::Unavailable
        );
        state.apply_executor("h", &ExecutorEvent::ExecutorActivated { at: t(1) });
        state.apply_executor(
            "h",
            &ExecutorEvent::ExecutorHeartbeat {
                lease_expires_at: t(31),
                at: t(1),
            },
        );
        state.apply_job(id(1), &submitted(1, "geo", 1, 2), &POLICY);
        state.apply_job(id(2), &submitted(2, "vision", 2, 3), &POLICY);
        let snapshot = state.snapshot(t(4), &POLICY);
        assert_eq!(snapshot.queue.len(), 2);
        assert_eq!(
            snapshot.executors[0].availability,
            ExecutorAvailability::Active
        );

        state.apply_job(id(1), &assigned(11, &["h-gpu0"], 5), &POLICY);
        let snapshot = state.snapshot(t(5), &POLICY);
        assert_eq!(snapshot.queue.len(), 1);
        assert!(snapshot.executors[0].gpus[0].busy);
        assert!(!snapshot.executors[0].gpus[1].busy);
        assert!(!state.is_queued(id(1)));
        assert!(state.is_queued(id(2)));
        // The 2-GPU job cannot go while gpu0 is held.
        assert!(schedule(&snapshot, t(5), &POLICY).is_empty());

        state.apply_job(
            id(1),
            &JobEvent::RunStarted {
                run_id: id(11),
                attempt: 1,
                executor_id: "h".into(),
                at: t(10),
            },
            &POLICY,
        );
        // A running run counts towards its account's usage up to now.
        let running = state.usage_at(t(20), &POLICY)["geo"];
        assert!(running > 9.9 && running <= 10.0, "{running}");
        state.apply_job(
            id(1),
            &JobEvent::RunFailed {
                run_id: id(11),
                attempt: 1,
                executor_id: "h".into(),
                gpu_uuids: vec!["h-gpu0".into()],
                started_at: Some(t(10)),
                exit_code: Some(1),
                signal: None,
                reason: "exit 1".into(),
                retryable: true,
                utilisation: None,
                at: t(20),
            },
            &POLICY,
        );
        state.apply_job(
            id(1),
            &JobEvent::RetryScheduled {
                next_attempt: 2,
                after_run: Some(id(11)),
                eligible_at: t(30),
                backoff_s: 10,
                trigger: RetryTrigger::Automatic,
                at: t(20),
            },
            &POLICY,
        );
        let snapshot = state.snapshot(t(21), &POLICY);
        assert!(
            !snapshot.executors[0].gpus[0].busy,
            "freed at the run's end"
        );
        let usage = state.usage_at(t(20), &POLICY)["geo"];
        assert!((usage - running).abs() < 1e-9, "{usage} vs {running}");
        // Back in the queue, in backoff: the 2-GPU job goes now, the retry waits.
        let assignments = schedule(&snapshot, t(21), &POLICY);
        assert_eq!(placed(&assignments), [id(2)]);
        let why = explain(&snapshot, id(1), t(21), &POLICY).unwrap();
        assert_eq!(why.waiting_for, [Blocker::Backoff { until: t(30) }]);

        // Cancelling a job frees its GPUs; the lease runs out without heartbeats.
        state.apply_job(id(2), &assigned(22, &["h-gpu0", "h-gpu1"], 22), &POLICY);
        assert_eq!(
            state.runs_on("h"),
            [Stranded {
                job_id: id(2),
                run_id: id(22)
            }]
        );
        state.apply_job(
            id(2),
            &JobEvent::JobCancelled {
                by: "ana".into(),
                reason: "wrong input".into(),
                previous_state: crate::job::JobState::Assigned,
                active_run: Some(id(22)),
                active_executor: Some("h".into()),
                at: t(23),
            },
            &POLICY,
        );
        assert!(state.runs_on("h").is_empty());
        assert!(state.expired_leases(t(30)).is_empty());
        assert_eq!(state.expired_leases(t(31)), ["h"]);
        assert_eq!(
            state.snapshot(t(31), &POLICY).executors[0].availability,
            ExecutorAvailability::Unavailable
        );
        state.apply_executor(
            "h",
            &ExecutorEvent::ExecutorLost {
                last_heartbeat_at: Some(t(1)),
                lease_expired_at: t(31),
                at: t(32),
            },
        );
        assert!(state.expired_leases(t(40)).is_empty(), "lost once");
    }
}
