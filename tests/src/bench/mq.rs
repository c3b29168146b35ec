//! The multiqueue and SMP rows of the benchmark: the `net-mq` guest (strict) against our own
//! back end with 1 and 2 queue pairs driven from 1 and 2 vCPUs, behind virtio-iommu and VT-d.
//! Each row has the transmit rate, the miss latency the back end saw, the guest's time waiting
//! for the other vCPU's vIOMMU request, and the CPU time of the busiest threads of the process
//! (iovmm and the back end run in it; `/proc/self/task/*/schedstat` sampled during the run), which
//! tells what limits the scaling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::{SerialMode, VmConfig};

use crate::backend::latency::LatencyStats;
use crate::backend::{BackendConfig, TestBackend};
use crate::guest::{test_guest_path, IommuMode, Scenario};
use crate::matrix::{socket, VmRun};

/// One multiqueue row.
#[derive(Debug, Clone)]
pub struct MqCell {
    /// The vIOMMU's name in the table.
    pub viommu: &'static str,
    /// Its `--iommu` option.
    pub spec: &'static str,
    /// Queue pairs the guest transmits on.
    pub pairs: u8,
    /// vCPUs driving them (one pair per vCPU when equal).
    pub cpus: u8,
    /// vCPUs started (at least `cpus`; the others spin idle in the guest, a control for the
    /// host CPU a polling vCPU takes).
    pub started: u8,
    /// Frames and their size.
    pub frames: u64,
    /// Frame size in bytes.
    pub size: u64,
}

/// The rows: for each vIOMMU, 1 pair on 1 vCPU, 2 pairs on 1 vCPU (alone, then with a second
/// vCPU spinning idle), 2 pairs on 2 vCPUs.
pub fn mq_cells(frames: u64, size: u64) -> Vec<MqCell> {
    let viommus = [("virtio-iommu", "virtio"), ("vt-d", "vtd,caching_mode=on")];
    let mut cells = Vec::new();
    for (viommu, spec) in viommus {
        for (pairs, cpus, started) in [(1, 1, 1), (2, 1, 1), (2, 1, 2), (2, 2, 2)] {
            cells.push(MqCell {
                viommu,
                spec,
                pairs,
                cpus,
                started,
                frames,
                size,
            });
        }
    }
    cells
}

/// CPU time one thread of this process used during a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadCpu {
    /// Its name (`comm`).
    pub name: String,
    /// Time on a CPU.
    pub busy: Duration,
    /// Times it blocked (a futex, a read, KVM halting it) and was preempted.
    pub switches: (u64, u64),
}

/// What one row measured.
#[derive(Debug)]
pub struct MqResult {
    /// The row.
    pub cell: MqCell,
    /// Frames per second of the transmit phase (guest TSC).
    pub fps: f64,
    /// MISS sent -> UPDATE received at the back end.
    pub miss: Option<LatencyStats>,
    /// Misses the back end sent.
    pub misses: u64,
    /// Share of the guest's vIOMMU time (map + unmap) spent waiting for the other vCPU.
    pub lock_wait_share: f64,
    /// Guest time of one MAP and one UNMAP (lock wait included), in µs.
    pub map_us: f64,
    /// See `map_us`.
    pub unmap_us: f64,
    /// Wall time of the VM's run.
    pub wall: Duration,
    /// Every thread that ran during it, busiest first.
    pub threads: Vec<ThreadCpu>,
}

/// Samples `/proc/self/task/*/schedstat` until stopped: per thread, the CPU time since the
/// first sample (threads that start later count from zero). Threads that end between two
/// samples lose their last interval.
struct ThreadSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<ThreadCpu>>,
}

/// One thread's counters: ns on a CPU, voluntary and involuntary context switches.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    ns: u64,
    voluntary: u64,
    involuntary: u64,
}

/// The context-switch counts of `/proc/.../status`.
fn switches(status: &str) -> (u64, u64) {
    let field = |key| super::memory::status_value(status, key).map_or(0, |(n, _)| n);
    (
        field("voluntary_ctxt_switches"),
        field("nonvoluntary_ctxt_switches"),
    )
}

/// (name, counters) of every thread of this process.
fn read_threads() -> HashMap<u32, (String, Sample)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let (voluntary, involuntary) = switches(&status);
        if let Some(ns) = ns {
            let sample = Sample {
                ns,
                voluntary,
                involuntary,
            };
            out.insert(tid, (name.trim().to_string(), sample));
        }
    }
    out
}

impl ThreadSampler {
    fn start(interval: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("mq-sampler".into())
            .spawn(move || {
                let base = read_threads();
                let mut last = base.clone();
                // The last read starts after the stop was seen, so it includes every CPU
                // second a thread had used before `finish` was called.
                loop {
                    std::thread::sleep(interval);
                    let stopping = flag.load(Ordering::Acquire);
                    last.extend(read_threads());
                    if stopping {
                        break;
                    }
                }
                let mut v: Vec<ThreadCpu> = last
                    .iter()
                    .map(|(tid, (name, now))| {
                        let before = base.get(tid).map_or(Sample::default(), |b| b.1);
                        ThreadCpu {
                            name: name.clone(),
                            busy: Duration::from_nanos(now.ns.saturating_sub(before.ns)),
                            switches: (
                                now.voluntary.saturating_sub(before.voluntary),
                                now.involuntary.saturating_sub(before.involuntary),
                            ),
                        }
                    })
                    .collect();
                v.sort_by_key(|t| std::cmp::Reverse(t.busy));
                v
            })?;
        Ok(ThreadSampler { stop, handle })
    }

    fn finish(self) -> Vec<ThreadCpu> {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

/// Runs one row; a failure (the guest's or the harness's) is returned as its message.
pub fn run_mq(cell: &MqCell, tsc_khz: u64) -> Result<MqResult, String> {
    let cell = cell.clone();
    let run = std::panic::AssertUnwindSafe(|| run_mq_inner(cell, tsc_khz));
    std::panic::catch_unwind(run).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "row failed".into())
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

fn run_mq_inner(cell: MqCell, tsc_khz: u64) -> MqResult {
    let label = format!(
        "mq-bench-{}-{}p{}c{}s",
        cell.viommu, cell.pairs, cell.cpus, cell.started
    );
    let sock = socket(&label);
    let config = BackendConfig {
        queue_pairs: usize::from(cell.pairs),
        miss_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("the back end listens");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_mq(cell.frames, cell.size, u64::from(cell.pairs))
        .iommu(IommuMode::Strict)
        .param("cpus", cell.cpus)
        .param("start_cpus", cell.started)
        .tsc_khz(tsc_khz)
        .timeout_ms(20_000)
        .cmdline()
        .expect("the command line fits");
    cfg.serial = SerialMode::Capture;
    cfg.cpus = cell.started;
    cfg.iommu = Some(cell.spec.parse().expect("a vIOMMU option"));
    let dev = format!(
        "net,socket={},iommu=on,queues={}",
        sock.display(),
        cell.pairs
    );
    cfg.vhost_user
        .push(dev.parse().expect("a vhost-user option"));
    let sampler = ThreadSampler::start(Duration::from_millis(10)).expect("sampler thread");
    let t0 = Instant::now();
    let run = VmRun::boot(&label, &cfg, Duration::from_secs(300));
    let wall = t0.elapsed();
    let threads = sampler.finish();
    let r = run.ok_result(&label);
    assert_eq!(r.u64("completed"), Some(cell.frames), "{}", run.serial);
    let cycles = r.u64("run_cycles").unwrap_or(0) as f64;
    let fps = if cycles > 0.0 && tsc_khz > 0 {
        cell.frames as f64 / (cycles / (tsc_khz as f64 * 1000.0))
    } else {
        0.0
    };
    let field = |k: &str| r.u64(k).unwrap_or(0);
    let iommu_cycles = field("map_cycles") + field("unmap_cycles");
    let lock_wait = field("lock_wait_cycles");
    let per_op_us =
        |cycles: u64, ops: u64| cycles as f64 * 1000.0 / tsc_khz.max(1) as f64 / ops.max(1) as f64;
    MqResult {
        fps,
        miss: backend.miss_latency(),
        misses: backend.counters().misses_sent,
        lock_wait_share: lock_wait as f64 / iommu_cycles.max(1) as f64,
        map_us: per_op_us(field("map_cycles"), field("maps")),
        unmap_us: per_op_us(field("unmap_cycles"), field("unmaps")),
        wall,
        threads,
        cell,
    }
}

/// The busiest `n` threads as "name NN%" of the run's wall time.
pub fn busiest(threads: &[ThreadCpu], wall: Duration, n: usize) -> String {
    threads
        .iter()
        .take(n)
        .map(|t| {
            let share = 100.0 * t.busy.as_secs_f64() / wall.as_secs_f64().max(1e-9);
            format!(
                "{} {share:.0}% ({}v/{}i)",
                t.name, t.switches.0, t.switches.1
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "2", or "1+1" for one driving vCPU and one idle.
fn vcpus(cell: &MqCell) -> String {
    if cell.started > cell.cpus {
        format!("{}+{}", cell.cpus, cell.started - cell.cpus)
    } else {
        cell.cpus.to_string()
    }
}

/// Prints the multiqueue / SMP table.
pub fn print_mq(results: &[Result<MqResult, String>], cells: &[MqCell]) {
    println!(
        "\nMultiqueue and SMP (net-mq, strict, own back end; thread CPU as % of the run's wall \
         time, with its voluntary/involuntary context switches):"
    );
    println!(
        "{:<13} {:>5} {:>5} {:>9} {:>14} {:>10} {:>14} {:>9}  busiest threads",
        "vIOMMU",
        "pairs",
        "vCPUs",
        "frames/s",
        "miss p50/p99us",
        "misses/frm",
        "map/unmap us",
        "lock wait"
    );
    for (res, cell) in results.iter().zip(cells) {
        match res {
            Ok(m) => println!(
                "{:<13} {:>5} {:>5} {:>9.0} {:>14} {:>10.2} {:>14} {:>8.0}%  {}",
                cell.viommu,
                cell.pairs,
                vcpus(cell),
                m.fps,
                m.miss.as_ref().map_or("-".into(), |l| format!(
                    "{:.1}/{:.1}",
                    super::us(l.p50),
                    super::us(l.p99)
                )),
                m.misses as f64 / cell.frames.max(1) as f64,
                format!("{:.1}/{:.1}", m.map_us, m.unmap_us),
                100.0 * m.lock_wait_share,
                busiest(&m.threads, m.wall, 5)
            ),
            Err(e) => println!(
                "{:<13} {:>5} {:>5} failed: {e}",
                cell.viommu,
                cell.pairs,
                vcpus(cell)
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_one_and_two_pairs_and_vcpus_per_viommu() {
        let cells = mq_cells(100, 256);
        let shape: Vec<_> = cells
            .iter()
            .map(|c| format!("{} {}p {}", c.viommu, c.pairs, vcpus(c)))
            .collect();
        assert_eq!(
            shape,
            [
                "virtio-iommu 1p 1",
                "virtio-iommu 2p 1",
                "virtio-iommu 2p 1+1",
                "virtio-iommu 2p 2",
                "vt-d 1p 1",
                "vt-d 2p 1",
                "vt-d 2p 1+1",
                "vt-d 2p 2"
            ]
        );
    }

    #[test]
    fn busiest_threads_are_shares_of_the_wall_time() {
        let t = |name: &str, ms| ThreadCpu {
            name: name.into(),
            busy: Duration::from_millis(ms),
            switches: (ms / 100, 2),
        };
        let threads = [t("iovmm_vcpu0", 900), t("backend", 450), t("idle", 1)];
        assert_eq!(
            busiest(&threads, Duration::from_secs(1), 2),
            "iovmm_vcpu0 90% (9v/2i), backend 45% (4v/2i)"
        );
    }

    #[test]
    fn context_switches_come_from_the_status_file() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(switches(status), (17, 3));
        assert_eq!(switches(""), (0, 0));
    }

    #[test]
    fn the_sampler_sees_a_busy_thread_of_this_process() {
        let sampler = ThreadSampler::start(Duration::from_millis(5)).unwrap();
        let (busy_tx, busy_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let spinner = std::thread::Builder::new()
            .name("mq-spin-test".into())
            .spawn(move || {
                // Spins until it has used 20 ms of CPU, then stays alive (blocked) until the
                // sampler has stopped, so its last sample includes that time.
                let own = || {
                    std::fs::read_to_string("/proc/thread-self/schedstat")
                        .ok()
                        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                        .unwrap_or(u64::MAX)
                };
                let start = own();
                while own().saturating_sub(start) < 20_000_000 {
                    std::hint::spin_loop();
                }
                busy_tx.send(()).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        busy_rx.recv().unwrap();
        let threads = sampler.finish();
        done_tx.send(()).unwrap();
        spinner.join().unwrap();
        // The spinner used 20 ms of CPU by its own reading; the per-thread figure the sampler
        // reads can lag that by up to a scheduler tick (4 ms), hence half of it.
        let spin = threads.iter().find(|t| t.name == "mq-spin-test");
        assert!(
            spin.is_some_and(|t| t.busy >= Duration::from_millis(10)),
            "{threads:?}"
        );
    }
}
