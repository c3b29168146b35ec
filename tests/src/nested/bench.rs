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

/// One cell of the nested IOTLB figure: a vIOMMU, mode and direction, and the scenarios of
/// each transport (vhost-user with our backend, vhost-user with DPDK testpmd, the kernel's
/// vhost-net) that measure it.
#[derive(Debug, Clone, Copy)]
pub struct IotlbCell {
    /// vIOMMU and guest mode, e.g. "virtio-iommu strict".
    pub label: &'static str,
    /// Transmit or receive.
    pub rx: bool,
    /// The scenario names: vhost-user own, vhost-user testpmd, vhost-net.
    pub scenarios: [Option<&'static str>; 3],
}

/// The transports of the figure, in column order.
pub const TRANSPORTS: [&str; 3] = ["vhost-user own", "vhost-user testpmd", "vhost-net"];

/// The cells of the figure (testpmd cannot receive behind a vIOMMU: it asks read-write for
/// Linux's write-only RX buffers, see docs/design/nested.md).
pub const IOTLB_CELLS: [IotlbCell; 5] = [
    IotlbCell {
        label: "virtio-iommu strict",
        rx: false,
        scenarios: [
            Some("viommu-strict-own"),
            Some("viommu-strict-dpdk"),
            Some("vhost-net-viommu-strict"),
        ],
    },
    IotlbCell {
        label: "virtio-iommu lazy",
        rx: false,
        scenarios: [
            Some("viommu-lazy-own"),
            Some("viommu-lazy-dpdk"),
            Some("vhost-net-viommu-lazy"),
        ],
    },
    IotlbCell {
        label: "VT-d strict",
        rx: false,
        scenarios: [
            Some("vtd-strict-own"),
            Some("vtd-strict-dpdk"),
            Some("vhost-net-vtd-strict"),
        ],
    },
    IotlbCell {
        label: "virtio-iommu strict",
        rx: true,
        scenarios: [
            Some("rx-viommu-strict-own"),
            None,
            Some("vhost-net-rx-viommu-strict"),
        ],
    },
    IotlbCell {
        label: "VT-d strict",
        rx: true,
        scenarios: [
            Some("rx-vtd-strict-own"),
            None,
            Some("vhost-net-rx-vtd-strict"),
        ],
    },
];

/// Misses, UPDATEs and INVALIDATEs per frame of one scenario run (`None`: it failed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerFrame {
    /// IOTLB misses per frame.
    pub misses: f64,
    /// UPDATEs per frame.
    pub updates: f64,
    /// INVALIDATEs per frame (the connection INVALIDATE included).
    pub invalidations: f64,
}

/// The figure: per cell and transport, the per-frame counts, or why there are none.
#[derive(Debug, Default)]
pub struct IotlbFigure {
    /// `(cell, per transport)`.
    pub rows: Vec<(IotlbCell, [Result<PerFrame, String>; 3])>,
}

fn per_frame(r: &super::ScenarioReport, frames: u32) -> Result<PerFrame, String> {
    if !r.passed() {
        return Err(r
            .failures
            .first()
            .cloned()
            .unwrap_or_else(|| "failed".into()));
    }
    let c = r.counters.as_ref().ok_or("no counters")?;
    let f = f64::from(frames.max(1));
    let get = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0) as f64 / f;
    Ok(PerFrame {
        misses: get("misses"),
        updates: get("updates"),
        invalidations: get("invalidations"),
    })
}

/// Runs every scenario of [`IOTLB_CELLS`] in one L1 and collects the figure.
pub fn iotlb_figure() -> Result<IotlbFigure, NestedError> {
    let img = NestedImage::locate()?;
    let all = super::acceptance();
    let names: Vec<&str> = IOTLB_CELLS
        .iter()
        .flat_map(|c| c.scenarios.iter().flatten().copied())
        .collect();
    let scs: Vec<Scenario> = all
        .into_iter()
        .filter(|s| names.contains(&s.name.as_str()))
        .collect();
    let suite = run_suite(&img, scs, &RunOptions::default())?;
    let find = |name: &str| {
        let i = suite.scenarios.iter().position(|s| s.name == name)?;
        Some(per_frame(&suite.reports[i], suite.scenarios[i].frames))
    };
    let rows = IOTLB_CELLS
        .iter()
        .map(|cell| {
            let per = cell.scenarios.map(|n| match n {
                None => Err("-".to_string()),
                Some(n) => find(n).unwrap_or_else(|| Err(format!("{n} not run"))),
            });
            (*cell, per)
        })
        .collect();
    Ok(IotlbFigure { rows })
}

impl IotlbFigure {
    /// The side-by-side table: per cell, misses / UPDATEs / INVALIDATEs per frame of each transport.
    pub fn table(&self) -> String {
        let mut s = format!("  {:22} {:3}", "vIOMMU (nested)", "dir");
        for t in TRANSPORTS {
            s.push_str(&format!(" | {t:^20}"));
        }
        s.push_str(&format!("\n  {:22} {:3}", "", ""));
        for _ in TRANSPORTS {
            s.push_str(&format!(" | {:>6} {:>6} {:>6}", "miss/f", "upd/f", "inv/f"));
        }
        s.push('\n');
        for (cell, per) in &self.rows {
            s.push_str(&format!(
                "  {:22} {:3}",
                cell.label,
                if cell.rx { "rx" } else { "tx" }
            ));
            for p in per {
                match p {
                    Ok(p) => s.push_str(&format!(
                        " | {:>6.2} {:>6.2} {:>6.2}",
                        p.misses, p.updates, p.invalidations
                    )),
                    Err(e) if e == "-" => s.push_str(&format!(" | {:^20}", "-")),
                    Err(_) => s.push_str(&format!(" | {:^20}", "FAILED")),
                }
            }
            s.push('\n');
        }
        for (cell, per) in &self.rows {
            for (t, p) in TRANSPORTS.iter().zip(per) {
                if let Err(e) = p.as_ref().map(|_| ()).map_err(|e| e.as_str()) {
                    if e != "-" {
                        s.push_str(&format!("  FAILED {} {t}: {e}\n", cell.label));
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_scenario_is_in_the_suite_and_counts_frames() {
        let all = crate::nested::acceptance();
        for cell in IOTLB_CELLS {
            for name in cell.scenarios.iter().flatten() {
                let sc = all.iter().find(|s| s.name == *name);
                let sc = sc.unwrap_or_else(|| panic!("{name} is not a scenario"));
                assert!(sc.frames > 0 && sc.rx == cell.rx, "{name}");
                assert!(sc.iommu.is_some(), "{name}");
            }
        }
    }

    #[test]
    fn the_table_puts_the_transports_side_by_side() {
        let p = |m: f64| {
            Ok(PerFrame {
                misses: m,
                updates: m,
                invalidations: 1.0,
            })
        };
        let fig = IotlbFigure {
            rows: vec![(
                IOTLB_CELLS[0],
                [p(0.04), Err("guest completed 998".into()), p(0.99)],
            )],
        };
        let t = fig.table();
        assert!(
            t.contains("vhost-user own") && t.contains("vhost-net"),
            "{t}"
        );
        assert!(t.contains("virtio-iommu strict"), "{t}");
        assert!(
            t.contains("0.04   0.04   1.00 |        FAILED        |   0.99   0.99   1.00"),
            "{t}"
        );
        assert!(
            t.contains("FAILED virtio-iommu strict vhost-user testpmd: guest completed 998"),
            "{t}"
        );
    }
}
