//! `overfly-tiles`: a demo workload that simulates satellite-tile inference. It processes N
//! tiles, prints ordinary log lines and progress in Overfly's protocol
//! (`OVERFLY {"progress":…,"metrics":{"tiles_done":…,"accuracy":…,"loss":…}}`), reports the
//! GPUs it was given (`CUDA_VISIBLE_DEVICES`), and can be told to fail or hang for tests and
//! demos. SIGTERM stops it after the current tile (exit 143) unless `--ignore-sigterm`.

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "overfly-tiles",
    about = "Simulated satellite-tile inference (Overfly demo workload)"
)]
struct Args {
    /// Tiles to process.
    #[arg(long, default_value_t = 100)]
    tiles: u64,
    /// Time per tile, milliseconds.
    #[arg(long, default_value_t = 50)]
    ms_per_tile: u64,
    /// Fail when reaching this tile (1-based), exiting with `--exit-code`.
    #[arg(long)]
    fail_at: Option<u64>,
    /// Exit code of a failure.
    #[arg(long, default_value_t = 1)]
    exit_code: u8,
    /// After the tiles (or at once with --tiles 0), hang until killed.
    #[arg(long)]
    hang: bool,
    /// Ignore SIGTERM (only SIGKILL stops it): for testing the executor's escalation.
    #[arg(long)]
    ignore_sigterm: bool,
    /// Region label printed in the logs.
    #[arg(long, default_value = "eu-west")]
    region: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> std::process::ExitCode {
    use std::io::Write;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let gpus = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    println!(
        "overfly-tiles pid={} pgid={} CUDA_VISIBLE_DEVICES={gpus} tiles={} region={}",
        std::process::id(),
        nix::unistd::getpgrp(),
        args.tiles,
        args.region
    );
    eprintln!(
        "loading model weights for {} GPU(s)",
        gpus.split(',').filter(|g| !g.is_empty()).count()
    );
    let mut sigterm = false;
    for tile in 1..=args.tiles {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(args.ms_per_tile)) => {}
            _ = term.recv(), if !args.ignore_sigterm => { sigterm = true; }
        }
        if sigterm {
            println!("received SIGTERM at tile {tile}; stopping");
            let _ = std::io::stdout().flush();
            return std::process::ExitCode::from(143);
        }
        if args.fail_at == Some(tile) {
            eprintln!(
                "tile {tile}: CUDA error: an illegal memory access was encountered (simulated)"
            );
            let _ = std::io::stderr().flush();
            return std::process::ExitCode::from(args.exit_code);
        }
        // A plausible learning curve: accuracy rises, loss falls, with a little jitter.
        let x = tile as f64 / args.tiles.max(1) as f64;
        let jitter = ((tile * 7919) % 13) as f64 / 1000.0;
        let accuracy = (0.62 + 0.33 * (1.0 - (-4.0 * x).exp()) + jitter).min(0.999);
        let loss = 1.4 * (-3.0 * x).exp() + 0.05 + jitter;
        println!(
            "tile {tile}/{} region={} detections={}",
            args.tiles,
            args.region,
            (tile * 31) % 17
        );
        println!(
            "OVERFLY {{\"progress\":{x:.4},\"metrics\":{{\"tiles_done\":{tile},\"accuracy\":{accuracy:.4},\"loss\":{loss:.4}}}}}"
        );
        let _ = std::io::stdout().flush();
    }
    if args.hang {
        println!("hanging (simulated deadlock)");
        let _ = std::io::stdout().flush();
        loop {
            tokio::select! {
                _ = term.recv(), if !args.ignore_sigterm => {
                    println!("received SIGTERM while hanging; stopping");
                    return std::process::ExitCode::from(143);
                }
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    }
    println!("done: {} tiles", args.tiles);
    std::process::ExitCode::SUCCESS
}
