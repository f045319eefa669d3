//! `courier-fuzz`: runs one fuzz target (or all, in turn) with the mutation harness for a given time, for
//! long runs without cargo-fuzz. `courier-fuzz <target|all> [--seconds N] [--seed S]`. A target stops at
//! its first crash (saved under `fuzz/artifacts/<target>/`) and the others still run; the exit status is
//! non-zero if any crashed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(which) = args.next() else {
        let names: Vec<&str> = courier_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: courier-fuzz <{}|all> [--seconds N] [--seed S]", names.join("|"));
        return ExitCode::from(2);
    };
    let mut seconds = 60u64;
    let mut seed = 1u64;
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--seconds", Some(v)) => seconds = v,
            ("--seed", Some(v)) => seed = v,
            _ => {
                eprintln!("unknown flag or value: {flag}");
                return ExitCode::from(2);
            }
        }
    }
    let targets: Vec<&str> = match which.as_str() {
        "all" => courier_fuzz::TARGETS.iter().map(|(n, _)| *n).collect(),
        name if courier_fuzz::target(name).is_some() => vec![name],
        name => {
            eprintln!("no fuzz target {name:?}");
            return ExitCode::from(2);
        }
    };
    // Each target gets an equal share of the time.
    let share = Duration::from_secs(seconds) / u32::try_from(targets.len()).unwrap_or(1);
    let mut crashed = false;
    for target in targets {
        let started = Instant::now();
        let outcome = courier_fuzz::harness::run(target, seed, u64::MAX, Some(started + share));
        let secs = started.elapsed().as_secs_f64();
        println!("{target}: {} executions in {secs:.0} s, seed {seed}", outcome.executions);
        if let Some(input) = outcome.crash {
            eprintln!("{target} crashed on {} bytes: {}", input.len(), hex::encode(&input));
            crashed = true;
        }
    }
    if crashed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
