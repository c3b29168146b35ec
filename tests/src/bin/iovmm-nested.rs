//! `iovmm-nested`: runs the nested Linux acceptance scenarios (or a subset)
//! in one QEMU-TCG L1 with nested SVM KVM and prints the per-scenario table.
//! Exits 1 when a scenario fails.

use std::time::Duration;

use clap::Parser;
use integration_tests::nested::{acceptance, run_suite, NestedImage, RunOptions, Scenario};
use iommu::error::chain;

/// Nested Linux acceptance runner.
#[derive(Debug, Parser)]
#[command(name = "iovmm-nested")]
struct Args {
    /// Run only scenarios whose name contains one of these (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Run each selected scenario this many times (in the same L1).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Echo every L1 console line.
    #[arg(long)]
    verbose: bool,
    /// Kill L0 after this many seconds.
    #[arg(long, default_value_t = 2700)]
    timeout_secs: u64,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let mut scs: Vec<_> = acceptance()
        .into_iter()
        .filter(|s| a.only.is_empty() || a.only.iter().any(|o| s.name.contains(o.as_str())))
        .collect();
    if a.list {
        for s in &scs {
            println!("{}\t{}", s.name, s.cmdline());
        }
        return std::process::ExitCode::SUCCESS;
    }
    let once = scs.clone();
    for _ in 1..a.repeat {
        scs.extend(once.iter().cloned());
    }
    if a.repeat > 1 {
        scs = repeat_named(scs);
    }
    let run = NestedImage::locate().and_then(|img| {
        let opts = RunOptions {
            timeout: Duration::from_secs(a.timeout_secs),
            verbose: a.verbose,
        };
        run_suite(&img, scs, &opts)
    });
    match run {
        Ok(s) => {
            println!("{}", s.summary());
            if s.passed() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("iovmm-nested: {e}", e = chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Gives repeated scenarios distinct names (`name-r2`, ...) so that their
/// markers and files do not collide.
fn repeat_named(mut scs: Vec<Scenario>) -> Vec<Scenario> {
    let mut seen = std::collections::HashMap::<String, u32>::new();
    for s in &mut scs {
        let n = seen.entry(s.name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            s.name = format!("{}-r{n}", s.name);
        }
    }
    scs
}
