//! The binary's start-up: effective configuration printed, a missing NVIDIA driver reported
//! clearly (exit 2), the simulated fallback used only when asked for.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXECUTOR: &str = env!("CARGO_BIN_EXE_overfly-executor");

fn driver_present() -> bool {
    overfly_executor::gpu::NvmlBackend::init().is_ok()
}

#[test]
fn without_a_driver_nvml_fails_clearly_and_the_fallback_is_used_only_when_asked() {
    if driver_present() {
        eprintln!("an NVIDIA driver is present: the no-driver path cannot be checked here");
        return;
    }
    let output = Command::new(EXECUTOR)
        .args(["--executor-id", "no-driver", "--gpus", "nvml"])
        .args(["--command-url", "http://user:secret@127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("effective configuration: executor_id=no-driver gpus=nvml"),
        "{stderr}"
    );
    assert!(
        stderr.contains("command_url=http://user:***@127.0.0.1:9"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
    assert!(
        stderr.contains("no NVIDIA driver (libnvidia-ml.so.1 not found)")
            && stderr.contains("use --gpus sim:4xH100-80GB"),
        "{stderr}"
    );

    // Asked for a fallback: it goes on with the simulated GPUs (and waits for NATS).
    let mut child = Command::new(EXECUTOR)
        .args(["--executor-id", "fallback", "--gpus", "nvml"])
        .args([
            "--fallback-gpus",
            "sim:2xL4-24GB",
            "--nats-url",
            "nats://127.0.0.1:9",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut gpus = 0;
    while let Some(Ok(line)) = lines.next() {
        if line.contains("GPU") && line.contains("NVIDIA L4") {
            gpus += 1;
        }
        seen.push(line);
        if gpus == 2 || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("using the fallback GPUs")),
        "{seen:#?}"
    );
    assert_eq!(gpus, 2, "{seen:#?}");
}
