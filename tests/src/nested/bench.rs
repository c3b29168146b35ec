//! The benchmark's nested figure: stock Linux boot time on nested KVM
//! (iovmm's start to the guest's first `/init` line, and to its power-off),
//! from `n` plain boots in one L1.

use std::time::Duration;

use super::scenario::Scenario;
use super::{run_suite, NestedError, NestedImage, RunOptions};

/// Boot times of the runs that passed, and how many failed.
#[derive(Debug, Default)]
pub struct BootFigure {
    /// iovmm start → the guest's first `/init` line.
    pub to_init: Vec<Duration>,
    /// iovmm start → iovmm's exit after the guest's power-off.
    pub to_exit: Vec<Duration>,
    /// Boots that did not pass, with the first failure.
    pub failed: Vec<String>,
}

fn boots(n: usize) -> Vec<Scenario> {
    (0..n)
        .map(|i| Scenario::boot(&format!("bench-boot-{i}")))
        .collect()
}

/// Boots the Linux guest `n` times in one L1.
pub fn boot_figure(n: usize) -> Result<BootFigure, NestedError> {
    let img = NestedImage::locate()?;
    let suite = run_suite(&img, boots(n), &RunOptions::default())?;
    let mut f = BootFigure::default();
    for r in &suite.reports {
        match (r.passed(), r.boot_to_init, r.vm_time) {
            (true, Some(i), Some(e)) => {
                f.to_init.push(i);
                f.to_exit.push(e);
            }
            _ => f.failed.push(format!(
                "{}: {}",
                r.name,
                r.failures.first().map_or("no times", String::as_str)
            )),
        }
    }
    Ok(f)
}
