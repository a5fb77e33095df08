//! GPUs: inventory and telemetry behind one trait, from NVML (nvml-wrapper, the real driver)
//! or from a simulated backend (`sim:4xH100-80GB`) whose utilisation, memory and power
//! follow what the executor runs on each simulated GPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One GPU as the executor registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub uuid: String,
    /// The index CUDA and NVML use on this host (what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    pub name: String,
    pub memory_total_mb: u64,
    pub memory_used_mb: u64,
    /// `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
    pub pci_bus_id: String,
}

pub use overfly_schemas::wire::GpuSample;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0}")]
    Unavailable(String),
    #[error("bad --gpus value {value:?}: {reason}")]
    BadSpec { value: String, reason: String },
    #[error("NVML: {0}")]
    Nvml(String),
}

/// What the executor needs from a GPU host.
pub trait GpuBackend: Send + Sync {
    /// `nvml` or `sim`.
    fn kind(&self) -> &'static str;
    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError>;
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;
    /// The executor tells the backend which GPUs run work (the simulated backend's
    /// telemetry follows it; real GPUs report what they really do).
    fn set_busy(&self, _index: u32, _busy: bool) {}
}

/// Parses `--gpus`: `nvml`, or `sim:<count>x<model>-<memory>GB[,…]`.
pub fn open(spec: &str, executor_id: &str) -> Result<Box<dyn GpuBackend>, GpuError> {
    if spec == "nvml" {
        return Ok(Box::new(NvmlBackend::init()?));
    }
    if let Some(models) = spec.strip_prefix("sim:") {
        return Ok(Box::new(SimBackend::parse(models, executor_id)?));
    }
    Err(GpuError::BadSpec {
        value: spec.to_string(),
        reason: "expected `nvml` or `sim:<count>x<model>-<memory>GB[,…]`, e.g. sim:4xH100-80GB"
            .into(),
    })
}

// ---------------------------------------------------------------------------------------
// Simulated GPUs
// ---------------------------------------------------------------------------------------

/// A GPU model the simulator knows: marketing name, compute capability, power range and
/// clocks, so its telemetry is plausible.
#[derive(Debug, Clone, Copy)]
struct Model {
    short: &'static str,
    name: &'static str,
    compute_capability: &'static str,
    idle_w: f64,
    max_w: f64,
    sm_clock_max_mhz: u32,
    memory_clock_mhz: u32,
}

const MODELS: &[Model] = &[
    Model {
        short: "H100",
        name: "NVIDIA H100 80GB HBM3",
        compute_capability: "9.0",
        idle_w: 70.0,
        max_w: 700.0,
        sm_clock_max_mhz: 1980,
        memory_clock_mhz: 2619,
    },
    Model {
        short: "H200",
        name: "NVIDIA H200",
        compute_capability: "9.0",
        idle_w: 75.0,
        max_w: 700.0,
        sm_clock_max_mhz: 1980,
        memory_clock_mhz: 3201,
    },
    Model {
        short: "A100",
        name: "NVIDIA A100-SXM4",
        compute_capability: "8.0",
        idle_w: 55.0,
        max_w: 400.0,
        sm_clock_max_mhz: 1410,
        memory_clock_mhz: 1593,
    },
    Model {
        short: "L40S",
        name: "NVIDIA L40S",
        compute_capability: "8.9",
        idle_w: 35.0,
        max_w: 350.0,
        sm_clock_max_mhz: 2520,
        memory_clock_mhz: 9001,
    },
    Model {
        short: "L4",
        name: "NVIDIA L4",
        compute_capability: "8.9",
        idle_w: 16.0,
        max_w: 72.0,
        sm_clock_max_mhz: 2040,
        memory_clock_mhz: 6251,
    },
    Model {
        short: "T4",
        name: "Tesla T4",
        compute_capability: "7.5",
        idle_w: 10.0,
        max_w: 70.0,
        sm_clock_max_mhz: 1590,
        memory_clock_mhz: 5001,
    },
];

#[derive(Debug, Clone)]
struct SimGpu {
    info: GpuInfo,
    model: Model,
    busy: bool,
    /// Samples taken so far (drives the deterministic noise).
    tick: u64,
    temperature_c: f64,
    utilisation: f64,
}

/// Simulated GPUs. Deterministic: the same executor id and spec give the same uuids and,
/// for the same sequence of busy/idle changes, the same telemetry.
pub struct SimBackend {
    gpus: Mutex<Vec<SimGpu>>,
}

/// Idle GPUs keep a little memory for the driver's context.
const IDLE_MEMORY_MB: u64 = 512;

impl SimBackend {
    /// `4xH100-80GB` or `2xA100-40GB,2xL4-24GB` (a count of 1 may be left out: `L4-24GB`).
    pub fn parse(models: &str, executor_id: &str) -> Result<Self, GpuError> {
        let bad = |reason: String| GpuError::BadSpec {
            value: format!("sim:{models}"),
            reason,
        };
        let mut gpus = Vec::new();
        for part in models.split(',').map(str::trim) {
            let (count, rest) = match part.split_once('x') {
                Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    (n.parse::<u32>().map_err(|e| bad(e.to_string()))?, rest)
                }
                _ => (1, part),
            };
            if count == 0 || count > 64 {
                return Err(bad(format!("{part:?}: count must be 1 to 64")));
            }
            let (short, memory) = rest.rsplit_once('-').ok_or_else(|| {
                bad(format!(
                    "{part:?}: expected <count>x<model>-<memory>GB, e.g. 4xH100-80GB"
                ))
            })?;
            let memory_gb: u64 = memory
                .strip_suffix("GB")
                .and_then(|gb| gb.parse().ok())
                .filter(|gb| (1..=1024).contains(gb))
                .ok_or_else(|| {
                    bad(format!(
                        "{part:?}: memory must be like 80GB (1 to 1024), got {memory:?}"
                    ))
                })?;
            let model = MODELS
                .iter()
                .find(|m| m.short.eq_ignore_ascii_case(short))
                .copied()
                .ok_or_else(|| {
                    let known: Vec<_> = MODELS.iter().map(|m| m.short).collect();
                    bad(format!(
                        "unknown GPU model {short:?}; known: {}",
                        known.join(", ")
                    ))
                })?;
            for _ in 0..count {
                let index = gpus.len() as u32;
                let uuid = uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("overfly-sim/{executor_id}/{index}").as_bytes(),
                );
                let name = if model.short == "A100" {
                    format!("{}-{memory_gb}GB", model.name)
                } else {
                    model.name.to_string()
                };
                gpus.push(SimGpu {
                    info: GpuInfo {
                        uuid: format!("GPU-{uuid}"),
                        index,
                        name,
                        memory_total_mb: memory_gb * 1024,
                        memory_used_mb: IDLE_MEMORY_MB,
                        compute_capability: model.compute_capability.into(),
                        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
                    },
                    model,
                    busy: false,
                    tick: 0,
                    temperature_c: 30.0,
                    utilisation: 0.0,
                });
            }
        }
        if gpus.len() > 64 {
            return Err(bad(format!("{} GPUs; at most 64", gpus.len())));
        }
        Ok(Self {
            gpus: Mutex::new(gpus),
        })
    }
}

/// Deterministic noise in [0, 1) from a GPU's identity and its tick (splitmix64).
fn noise(seed: &str, tick: u64) -> f64 {
    let mut x = seed
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
        .wrapping_add(tick.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self
            .gpus
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.info.clone())
            .collect())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let mut gpus = self.gpus.lock().unwrap();
        Ok(gpus
            .iter_mut()
            .map(|gpu| {
                gpu.tick += 1;
                let n = noise(&gpu.info.uuid, gpu.tick);
                // A busy GPU runs kernels 85–99% of the time; an idle one none.
                let target = if gpu.busy { 0.85 + 0.14 * n } else { 0.0 };
                // Utilisation ramps up within a couple of samples and drops at once.
                gpu.utilisation = if gpu.busy {
                    (gpu.utilisation + 0.6 * (target - gpu.utilisation)).max(0.5)
                } else {
                    0.0
                };
                let total = gpu.info.memory_total_mb;
                gpu.info.memory_used_mb = if gpu.busy {
                    (total as f64 * (0.62 + 0.08 * n)) as u64
                } else {
                    IDLE_MEMORY_MB.min(total)
                };
                let u = gpu.utilisation;
                let temperature_target = 30.0 + 48.0 * u;
                gpu.temperature_c += 0.3 * (temperature_target - gpu.temperature_c);
                let m = gpu.model;
                GpuSample {
                    index: gpu.info.index,
                    uuid: gpu.info.uuid.clone(),
                    utilisation: u,
                    memory_utilisation: Some(if gpu.busy { u * (0.5 + 0.3 * n) } else { 0.0 }),
                    memory_used_mb: gpu.info.memory_used_mb,
                    memory_total_mb: total,
                    temperature_c: Some(gpu.temperature_c.round() as u32),
                    power_w: Some(
                        ((m.idle_w + (m.max_w - m.idle_w) * u * (0.9 + 0.1 * n)) * 10.0).round()
                            / 10.0,
                    ),
                    sm_clock_mhz: Some(if gpu.busy {
                        m.sm_clock_max_mhz - (n * 90.0) as u32
                    } else {
                        345
                    }),
                    memory_clock_mhz: Some(m.memory_clock_mhz),
                    ecc_uncorrected: Some(0),
                    health: "ok".into(),
                }
            })
            .collect())
    }

    fn set_busy(&self, index: u32, busy: bool) {
        if let Some(gpu) = self
            .gpus
            .lock()
            .unwrap()
            .iter_mut()
            .find(|g| g.info.index == index)
        {
            gpu.busy = busy;
        }
    }
}

// ---------------------------------------------------------------------------------------
// NVML
// ---------------------------------------------------------------------------------------

/// Real GPUs through NVML. `libnvidia-ml.so.1` is loaded at run time, so the executor builds
/// and starts on hosts without a driver; there `init` fails with a clear message.
pub struct NvmlBackend {
    /// One per process, for its lifetime (the XID watchers borrow it from their threads).
    nvml: &'static nvml_wrapper::Nvml,
    /// Critical XID errors seen per GPU index since the executor started.
    xids: Arc<Mutex<BTreeMap<u32, XidSeen>>>,
}

/// The critical XID errors (NVML events) one GPU reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XidSeen {
    /// The last XID number (e.g. 79: the GPU fell off the bus); `None` if NVML did not say.
    pub last: Option<u64>,
    pub count: u64,
}

impl XidSeen {
    /// How a sample's health reads with these errors.
    pub fn describe(&self) -> String {
        let last = self
            .last
            .map_or_else(|| "unknown".to_string(), |x| x.to_string());
        format!("{} critical XID errors, last XID {last}", self.count)
    }
}

/// One thread per GPU waits for its critical XID events (NVML event sets are per process and
/// block) and records them for the samples. A GPU that does not support the events is
/// logged and left unwatched.
fn watch_xids(nvml: &'static nvml_wrapper::Nvml, xids: Arc<Mutex<BTreeMap<u32, XidSeen>>>) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    use nvml_wrapper::error::NvmlError;
    let count = nvml.device_count().unwrap_or(0);
    for index in 0..count {
        let xids = xids.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nvml-xid-{index}"))
            .spawn(move || {
                let registered = nvml.create_event_set().map_err(|e| e.to_string()).and_then(|set| {
                    let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
                    device
                        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                        .map_err(|e| e.to_string())
                });
                let set = match registered {
                    Ok(set) => set,
                    Err(error) => {
                        tracing::warn!(index, %error, "GPU does not report XID events; not watched");
                        return;
                    }
                };
                loop {
                    match set.wait(5_000) {
                        Ok(event) => {
                            let last = match event.event_data {
                                Some(XidError::Value(xid)) => Some(xid),
                                _ => None,
                            };
                            tracing::error!(index, xid = ?last, "critical XID error");
                            let mut xids = xids.lock().unwrap_or_else(|p| p.into_inner());
                            let seen = xids.entry(index).or_default();
                            seen.last = last;
                            seen.count += 1;
                        }
                        Err(NvmlError::Timeout) => {}
                        Err(error) => {
                            tracing::warn!(index, %error, "stopped watching XID events");
                            return;
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(index, %error, "could not start the XID watcher");
        }
    }
}

/// What a failed `Nvml::init` means, in words an operator can act on.
pub fn describe_init_error(error: &nvml_wrapper::error::NvmlError) -> String {
    use nvml_wrapper::error::NvmlError;
    let hint = "; use --gpus sim:4xH100-80GB for simulated GPUs, or --fallback-gpus sim:… to \
                fall back to them";
    match error {
        NvmlError::LibloadingError(e) => {
            format!("no NVIDIA driver (libnvidia-ml.so.1 not found): {e}{hint}")
        }
        NvmlError::LibraryNotFound => {
            format!("no NVIDIA driver (libnvidia-ml.so.1 not found): {error}{hint}")
        }
        NvmlError::DriverNotLoaded => {
            format!("the NVIDIA driver is installed but not loaded: {error}{hint}")
        }
        NvmlError::NoPermission => {
            format!("no permission to talk to the NVIDIA driver: {error}{hint}")
        }
        other => format!("NVML failed to initialise: {other}{hint}"),
    }
}

impl NvmlBackend {
    pub fn init() -> Result<Self, GpuError> {
        let nvml = nvml_wrapper::Nvml::init()
            .map_err(|e| GpuError::Unavailable(describe_init_error(&e)))?;
        let nvml: &'static nvml_wrapper::Nvml = Box::leak(Box::new(nvml));
        let xids = Arc::new(Mutex::new(BTreeMap::new()));
        watch_xids(nvml, xids.clone());
        Ok(Self { nvml, xids })
    }
}

/// `ok`, or what looks wrong: uncorrected ECC errors, critical XID errors.
fn health(ecc_uncorrected: Option<u64>, xid: Option<XidSeen>) -> String {
    let mut problems = Vec::new();
    if let Some(n) = ecc_uncorrected.filter(|n| *n > 0) {
        problems.push(format!("{n} uncorrected ECC errors"));
    }
    if let Some(xid) = xid.filter(|x| x.count > 0) {
        problems.push(xid.describe());
    }
    if problems.is_empty() {
        "ok".to_string()
    } else {
        problems.join("; ")
    }
}

fn nvml_err(what: &str) -> impl Fn(nvml_wrapper::error::NvmlError) -> GpuError + '_ {
    move |e| GpuError::Nvml(format!("{what}: {e}"))
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let count = self.nvml.device_count().map_err(nvml_err("device count"))?;
        (0..count)
            .map(|i| {
                let device = self
                    .nvml
                    .device_by_index(i)
                    .map_err(nvml_err("device by index"))?;
                let memory = device.memory_info().map_err(nvml_err("memory info"))?;
                let cc = device
                    .cuda_compute_capability()
                    .map_err(nvml_err("compute capability"))?;
                Ok(GpuInfo {
                    uuid: device.uuid().map_err(nvml_err("uuid"))?,
                    index: device.index().unwrap_or(i),
                    name: device.name().map_err(nvml_err("name"))?,
                    memory_total_mb: memory.total / (1024 * 1024),
                    memory_used_mb: memory.used / (1024 * 1024),
                    compute_capability: format!("{}.{}", cc.major, cc.minor),
                    pci_bus_id: device
                        .pci_info()
                        .map(|p| p.bus_id)
                        .unwrap_or_else(|_| "unknown".into()),
                })
            })
            .collect()
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        use nvml_wrapper::enum_wrappers::device::{
            Clock, EccCounter, MemoryError, TemperatureSensor,
        };
        let count = self.nvml.device_count().map_err(nvml_err("device count"))?;
        (0..count)
            .map(|i| {
                let device = self
                    .nvml
                    .device_by_index(i)
                    .map_err(nvml_err("device by index"))?;
                let memory = device.memory_info().map_err(nvml_err("memory info"))?;
                let rates = device.utilization_rates().ok();
                let ecc = device
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok();
                let index = device.index().unwrap_or(i);
                let xid = self
                    .xids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&index)
                    .copied();
                let health = health(ecc, xid);
                Ok(GpuSample {
                    index,
                    uuid: device.uuid().map_err(nvml_err("uuid"))?,
                    utilisation: rates.as_ref().map_or(0.0, |r| f64::from(r.gpu) / 100.0),
                    memory_utilisation: rates.as_ref().map(|r| f64::from(r.memory) / 100.0),
                    memory_used_mb: memory.used / (1024 * 1024),
                    memory_total_mb: memory.total / (1024 * 1024),
                    temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                    power_w: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                    sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                    memory_clock_mhz: device.clock_info(Clock::Memory).ok(),
                    ecc_uncorrected: ecc,
                    health,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn health_names_ecc_and_xid_errors() {
        assert_eq!(health(None, None), "ok");
        assert_eq!(health(Some(0), Some(XidSeen::default())), "ok");
        assert_eq!(health(Some(2), None), "2 uncorrected ECC errors");
        let xid = XidSeen {
            last: Some(79),
            count: 3,
        };
        assert_eq!(
            health(Some(1), Some(xid)),
            "1 uncorrected ECC errors; 3 critical XID errors, last XID 79"
        );
        let unknown = XidSeen {
            last: None,
            count: 1,
        };
        assert_eq!(
            health(None, Some(unknown)),
            "1 critical XID errors, last XID unknown"
        );
    }

    use super::*;

    #[test]
    fn parses_one_model_with_a_count() {
        let sim = SimBackend::parse("4xH100-80GB", "gpu-host-1").unwrap();
        let gpus = sim.inventory().unwrap();
        assert_eq!(gpus.len(), 4);
        for (i, gpu) in gpus.iter().enumerate() {
            assert_eq!(gpu.index, i as u32);
            assert_eq!(gpu.name, "NVIDIA H100 80GB HBM3");
            assert_eq!(gpu.memory_total_mb, 80 * 1024);
            assert_eq!(gpu.compute_capability, "9.0");
            assert!(gpu.uuid.starts_with("GPU-"), "{}", gpu.uuid);
        }
        let uuids: std::collections::HashSet<_> = gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 4, "uuids are distinct");
    }

    #[test]
    fn parses_mixed_models_and_indexes_them_in_order() {
        let sim = SimBackend::parse("2xA100-40GB,2xL4-24GB", "h").unwrap();
        let gpus = sim.inventory().unwrap();
        let names: Vec<_> = gpus.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "NVIDIA A100-SXM4-40GB",
                "NVIDIA A100-SXM4-40GB",
                "NVIDIA L4",
                "NVIDIA L4"
            ]
        );
        assert_eq!(gpus[3].index, 3);
        assert_eq!(gpus[2].memory_total_mb, 24 * 1024);
        assert_eq!(gpus[2].compute_capability, "8.9");
        assert_eq!(
            SimBackend::parse("L4-24GB", "h")
                .unwrap()
                .inventory()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn uuids_are_deterministic_per_executor() {
        let a = SimBackend::parse("2xH100-80GB", "host-a")
            .unwrap()
            .inventory()
            .unwrap();
        let again = SimBackend::parse("2xH100-80GB", "host-a")
            .unwrap()
            .inventory()
            .unwrap();
        let b = SimBackend::parse("2xH100-80GB", "host-b")
            .unwrap()
            .inventory()
            .unwrap();
        assert_eq!(a, again);
        assert_ne!(a[0].uuid, b[0].uuid);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, expected) in [
            ("4xB999-80GB", "unknown GPU model"),
            ("4xH100", "expected <count>x<model>-<memory>GB"),
            ("4xH100-80", "memory must be like 80GB"),
            ("0xH100-80GB", "count must be 1 to 64"),
            ("65xH100-80GB", "count must be 1 to 64"),
        ] {
            let error = SimBackend::parse(spec, "h").err().unwrap().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
        }
        let error = open("cuda:4", "h").err().unwrap().to_string();
        assert!(error.contains("expected `nvml` or `sim:"), "{error}");
    }

    #[test]
    fn telemetry_follows_what_runs_on_each_gpu() {
        let sim = SimBackend::parse("2xH100-80GB", "h").unwrap();
        let idle = sim.sample().unwrap();
        assert!(idle.iter().all(|s| s.utilisation == 0.0));
        assert!(idle.iter().all(|s| s.memory_used_mb == IDLE_MEMORY_MB));
        sim.set_busy(1, true);
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples = sim.sample().unwrap();
        }
        assert_eq!(samples[0].utilisation, 0.0, "GPU 0 stays idle");
        assert!(samples[1].utilisation >= 0.85, "{}", samples[1].utilisation);
        assert!(samples[1].utilisation < 1.0);
        assert!(samples[1].memory_used_mb > 40 * 1024);
        assert!(samples[1].power_w.unwrap() > samples[0].power_w.unwrap() * 4.0);
        assert!(samples[1].temperature_c.unwrap() > samples[0].temperature_c.unwrap());
        assert!(samples[1].sm_clock_mhz.unwrap() > samples[0].sm_clock_mhz.unwrap());
        sim.set_busy(1, false);
        let after = sim.sample().unwrap();
        assert_eq!(after[1].utilisation, 0.0);
        assert_eq!(after[1].memory_used_mb, IDLE_MEMORY_MB);
        assert_eq!(sim.inventory().unwrap()[1].memory_used_mb, IDLE_MEMORY_MB);
    }

    #[test]
    fn telemetry_is_deterministic() {
        let run = || {
            let sim = SimBackend::parse("1xA100-80GB", "h").unwrap();
            sim.set_busy(0, true);
            (0..10).map(|_| sim.sample().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn nvml_init_errors_name_the_missing_driver_and_the_way_out() {
        use nvml_wrapper::error::NvmlError;
        let missing = describe_init_error(&NvmlError::LibraryNotFound);
        assert!(
            missing.contains("no NVIDIA driver (libnvidia-ml.so.1 not found)"),
            "{missing}"
        );
        assert!(missing.contains("--gpus sim:4xH100-80GB"), "{missing}");
        let not_loaded = describe_init_error(&NvmlError::DriverNotLoaded);
        assert!(not_loaded.contains("not loaded"), "{not_loaded}");
    }

    /// On this host for real: either NVML works and reports a sane inventory, or it fails
    /// with the message above (never a panic, never a silent fallback).
    #[test]
    fn nvml_backend_reports_real_gpus_or_says_why_not() {
        match NvmlBackend::init() {
            Ok(nvml) => {
                let gpus = nvml.inventory().unwrap();
                for gpu in &gpus {
                    assert!(gpu.uuid.starts_with("GPU-") || gpu.uuid.starts_with("MIG-"));
                    assert!(gpu.memory_total_mb > 0);
                }
                assert_eq!(nvml.sample().unwrap().len(), gpus.len());
            }
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains("NVIDIA driver") || message.contains("NVML"),
                    "{message}"
                );
                assert!(message.contains("--gpus sim:4xH100-80GB"), "{message}");
                assert!(open("nvml", "h").is_err());
            }
        }
    }
}
