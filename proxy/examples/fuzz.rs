//! The long fuzzing campaign: `cargo run --release -p pgwarden-proxy --example fuzz -- N [SEED]`
//! runs N mutated inputs through every parser's target and prints, per target, the inputs run,
//! the slowest input and the process's peak resident memory. A panic stops it with the target's
//! name and seed printed first.

use std::time::Instant;

use pgwarden_proxy::fuzz::{run, TARGETS};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let inputs: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0x5eed);
    println!(
        "| target | inputs | slowest input | longest input (bytes) | seconds | peak RSS (KiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut total = 0;
    for (i, target) in TARGETS.iter().enumerate() {
        eprintln!("fuzzing {} with seed {}", target.name, seed + i as u64);
        let started = Instant::now();
        let campaign = run(target, inputs, seed + i as u64);
        total += campaign.inputs;
        println!(
            "| {} | {} | {:?} | {} | {:.1} | {} |",
            target.name,
            campaign.inputs,
            campaign.slowest,
            campaign.longest_input,
            started.elapsed().as_secs_f64(),
            peak_rss_kib()
        );
    }
    println!("\n{total} inputs, 0 panics.");
}
