//! `iovmm-bench`: prints the project's performance table.
//!
//! ```text
//! cargo run --release -p integration-tests --bin iovmm-bench [-- --frames N --no-qemu --no-dpdk --no-rx --no-blk]
//! cargo run --release -p integration-tests --bin iovmm-bench -- --no-qemu --soak 20 --frames 20000 --load
//! ```
//!
//! `--soak N` runs each translated cell ({virtio-iommu, VT-d+DT/ATS, VT-d} ×
//! {strict, lazy, strict+prefetch}) N times against DPDK testpmd (optionally
//! under `--load [THREADS]` busy loops the bench starts and stops), prints
//! stalls, frames/s, misses per frame and ring-overlapping INVALIDATEs per
//! cell, and exits non-zero if any run stalled or failed.
//!
//! Guest boot time, VMM RSS, and for every vIOMMU × guest mode cell the DMA
//! rate, IOTLB messages per frame and miss service latency (as the backend
//! sees it: MISS sent → UPDATE received). Then the same protocol-level
//! metrics for each reference QEMU found (the installed one, QEMU 10.0 from
//! bookworm-backports, and bookworm's 7.2 unpacked by
//! `resources/fetch-qemu72.sh`; TCG, Linux guest, same own backend), each
//! labelled with the version its binary reports, and the ratios.
//! The floors of the machine (socket round trip blocking and spinning, guest exit, eventfd
//! wake-up; `--floors-only`, `--no-floors`) come first, measured in the same run, and after the
//! TX table each translated cell's costs over them.
//! The RX and loop-back rows (`--no-rx` skips them) and the virtio-blk rows
//! (`--no-blk`) follow the TX cells; `--only` filters every table.
//! After the boot RSS, the VMM memory table (`--memory-only`, `--no-memory`,
//! `--memory-reps N`): iovmm's RssAnon/RssFile/RssShmem per vCPU and per device.
//! After the TX table, the multiqueue / SMP rows (`--mq-only`, `--no-mq`): 1 and 2 queue pairs
//! from 1 and 2 vCPUs, with the threads that used the CPU.

use std::time::Duration;

use clap::Parser;
use integration_tests::bench::floor::{self, Floors};
use integration_tests::bench::ratio::print_floor_ratios;
use integration_tests::bench::{
    bench_cells, boot_times, fmt_latency, host_tsc_khz, percentiles, run_cell, sibling_binary,
    soak, soak_cells, us, viommu_name, BenchBackend, CellResult, CpuLoad, SoakCell, SoakRun,
};
use integration_tests::guest::IommuMode;
use integration_tests::matrix::{Cell, Viommu};
use integration_tests::qemu::{
    self, reference_qemus, GuestMode, QemuBackend, QemuBinary, QemuConfig, QemuIommu, QemuRun,
};
use iommu::error::chain;

#[derive(Debug, Parser)]
#[command(
    about = "iovmm benchmark: floors, boot, RSS, DMA rate, IOTLB traffic, QEMU 10 and 7.2 ratios"
)]
struct Args {
    /// Frames per DMA cell (default 5000, or 20000 with --soak).
    #[arg(long)]
    frames: Option<u64>,
    /// Frame size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// Boot runs.
    #[arg(long, default_value_t = 20)]
    boots: usize,
    /// Skip the QEMU reference runs.
    #[arg(long)]
    no_qemu: bool,
    /// Only the reference QEMUs whose version starts with this (e.g. 10 or 7.2).
    #[arg(long, value_name = "VERSION")]
    qemu_version: Option<String>,
    /// Skip the DPDK testpmd cells.
    #[arg(long)]
    no_dpdk: bool,
    /// Skip the virtio-blk rows (own backend, qemu-storage-daemon).
    #[arg(long)]
    no_blk: bool,
    /// Skip the RX and loop-back rows (own backend's generator and loop-back,
    /// testpmd macswap loop-back unless --no-dpdk).
    #[arg(long)]
    no_rx: bool,
    /// Only cells whose vIOMMU name contains this (none, virtio-iommu, vt-d).
    #[arg(long)]
    only: Option<String>,
    /// Frames per QEMU run (TCG is slow).
    #[arg(long, default_value_t = 2000)]
    qemu_frames: u64,
    /// Linux boots on nested KVM (QEMU TCG L0 + SVM L1; needs resources/build-nested-l1.sh).
    #[arg(long, default_value_t = 5)]
    nested_boots: usize,
    /// Skip the nested IOTLB figure (misses, UPDATEs and INVALIDATEs per frame of vhost-user
    /// and the kernel's vhost-net side by side, in one nested L1).
    #[arg(long)]
    no_nested_iotlb: bool,
    /// Run and print only the nested IOTLB figure.
    #[arg(long, conflicts_with_all = ["no_nested_iotlb", "soak", "floors_only"])]
    nested_iotlb_only: bool,
    /// Soak mode: run every translated cell N times against DPDK (at least
    /// 20000 frames each for the documented soak) and report stalls.
    #[arg(long, value_name = "N")]
    soak: Option<usize>,
    /// With --soak: compete for the CPUs with THREADS busy loops (default 1)
    /// started before the first run and stopped after the last.
    #[arg(long, value_name = "THREADS", num_args = 0..=1, default_missing_value = "1")]
    load: Option<usize>,
    /// Round trips, wake-ups and guest exits per floor (socket, guest exit, eventfd).
    #[arg(long, default_value_t = floor::DEFAULT_ITERATIONS)]
    floor_iterations: usize,
    /// Measure and print only the floors.
    #[arg(long, conflicts_with_all = ["no_floors", "soak"])]
    floors_only: bool,
    /// Skip the floors (and the cells' ratios over them).
    #[arg(long)]
    no_floors: bool,
    /// Busy-poll window A/B: run the strict and lazy TX cells (after the floors; `--only`,
    /// `--no-dpdk` and `--frames` apply) once per `poll_us` value in the list, interleaved,
    /// print the A/B table and stop.
    #[arg(long, value_name = "US,US,...", value_delimiter = ',', conflicts_with_all = ["soak", "floors_only"])]
    poll_ab: Vec<u64>,
    /// With --poll-ab: interleaved repetitions of every variant.
    #[arg(long, default_value_t = 3)]
    poll_reps: usize,
    /// Run and print only the VMM memory table (RSS per vCPU and per device).
    #[arg(long, conflicts_with_all = ["no_memory", "soak", "floors_only", "nested_iotlb_only"])]
    memory_only: bool,
    /// Skip the VMM memory table.
    #[arg(long)]
    no_memory: bool,
    /// Runs per configuration of the memory table (the table shows the median).
    #[arg(long, default_value_t = 3)]
    memory_reps: usize,
    /// Run and print only the multiqueue / SMP table.
    #[arg(long, conflicts_with_all = ["no_mq", "soak", "floors_only"])]
    mq_only: bool,
    /// Skip the multiqueue / SMP table.
    #[arg(long)]
    no_mq: bool,
}

/// Frames per cell of the table.
const FRAMES: u64 = 5000;
/// Frames per soak run (the issue's acceptance soak is 20 runs of 20000).
const SOAK_FRAMES: u64 = 20_000;

/// Upper bound of the soak's competing load, whatever happens to the bench.
const LOAD_LIMIT: Duration = Duration::from_secs(6 * 3600);

fn mode_name(c: &integration_tests::matrix::Cell) -> String {
    format!(
        "{}{}",
        c.mode.as_str(),
        if c.prefetch { "+pref" } else { "" }
    )
}

fn print_soak(cells: &[SoakCell]) {
    println!(
        "\n== Soak against DPDK testpmd ({} frames per run)",
        cells.first().map(|c| c.cell.frames).unwrap_or(0)
    );
    println!("| vIOMMU | mode | runs | stalls | failed | frames/s p50 | frames/s min | miss/frame | ring inv/run (max) | unchanged/run | stall reports |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let s = c.summary();
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.2} ({}) | {:.1} | {} |",
            viommu_name(c.cell.viommu),
            mode_name(&c.cell),
            s.runs,
            s.stalls,
            s.failures,
            s.fps_p50,
            s.fps_min,
            s.misses_per_frame,
            s.ring_invalidations_per_run,
            s.ring_invalidations_max,
            s.unchanged_per_run,
            s.stall_reports,
        );
    }
}

fn soak_progress(started: std::time::Instant) -> impl FnMut(&Cell, usize, &SoakRun) {
    move |c, i, r| {
        let what = match r {
            SoakRun::Ok(s) => format!(
                "ok {:.0} frames/s, {} ring inv",
                s.frames_per_sec, s.ring_invalidations
            ),
            SoakRun::Stall(m) => format!("STALL {m}"),
            SoakRun::Failed(m) => format!("FAILED {m}"),
        };
        eprintln!(
            "[{:>6.0} s] run {} {} {}: {what}",
            started.elapsed().as_secs_f64(),
            i + 1,
            viommu_name(c.viommu),
            mode_name(c)
        );
    }
}

/// The soak; true if every run passed.
fn run_soak(args: &Args, runs: usize, tsc_khz: u64) -> bool {
    let frames = args.frames.unwrap_or(SOAK_FRAMES);
    let cells: Vec<Cell> = soak_cells(frames, args.size, tsc_khz)
        .into_iter()
        .filter(|c| wanted(args, c))
        .collect();
    let load = match args.load.map(|n| CpuLoad::start(n, LOAD_LIMIT)) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            eprintln!("iovmm-bench: cannot start the CPU load: {e}");
            return false;
        }
        None => None,
    };
    println!(
        "iovmm-bench: soak, {runs} runs x {} cells x {} frames, competing load: {}",
        cells.len(),
        frames,
        args.load
            .map_or("none".to_string(), |n| format!("{n} busy thread(s)"))
    );
    let started = std::time::Instant::now();
    let results = soak(&cells, runs, tsc_khz, soak_progress(started));
    if let Some(l) = load {
        l.stop();
    }
    print_soak(&results);
    println!("  ({:.0} s)", started.elapsed().as_secs_f64());
    results
        .iter()
        .all(|c| c.runs.iter().all(|r| matches!(r, SoakRun::Ok(_))))
}

fn wanted(args: &Args, c: &Cell) -> bool {
    args.only
        .as_deref()
        .is_none_or(|o| viommu_name(c.viommu).contains(o))
}

fn print_boot_and_rss(args: &Args) {
    let mut t = boot_times(args.boots);
    let (p50, p99) = percentiles(&mut t);
    println!(
        "\n== Guest boot (fast test guest, start to exit, {} runs)",
        t.len()
    );
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    let Some(iovmm) = sibling_binary("iovmm-cli") else {
        println!("  (iovmm binary not built; skipping RSS: cargo build --release -p integration-tests --bins)");
        return;
    };
    match integration_tests::bench::memory::hello(&iovmm) {
        Ok(m) => println!(
            "\n== VMM RSS\n  hello guest after its workload, 256M RAM: VmHWM {} KiB (VmRSS {} KiB: {} private, {} files, {} guest RAM)",
            m.vm_hwm, m.vm_rss, m.rss_anon, m.rss_file, m.rss_shmem
        ),
        Err(e) => println!("\n== VMM RSS: {}", chain(&e)),
    }
}

fn print_memory(reps: usize) {
    match sibling_binary("iovmm-cli") {
        Some(iovmm) => integration_tests::bench::memory::print_memory(&iovmm, reps),
        None => println!(
            "\n== VMM memory: iovmm binary not built (cargo build --release -p integration-tests --bins)"
        ),
    }
}

fn print_nested_boot(n: usize) {
    println!("\n== Linux guest boot on nested KVM (QEMU TCG + SVM L1, {n} runs in one L1)");
    match integration_tests::nested::bench::boot_figure(n) {
        Ok(mut f) => {
            let (i50, i99) = percentiles(&mut f.to_init);
            let (e50, e99) = percentiles(&mut f.to_exit);
            println!(
                "  to /init p50 {:.2} s p99 {:.2} s   to power-off p50 {:.2} s p99 {:.2} s   ({} passed)",
                i50.as_secs_f64(),
                i99.as_secs_f64(),
                e50.as_secs_f64(),
                e99.as_secs_f64(),
                f.to_init.len()
            );
            for fail in &f.failed {
                println!("  FAILED {fail}");
            }
        }
        Err(e) => println!("  skipped: {e}", e = chain(&e)),
    }
}

fn print_nested_iotlb() {
    println!(
        "\n== IOTLB messages per frame, nested (QEMU TCG + SVM L1, L2 Linux, 1000 x 256-byte frames): \
         vhost-user and the kernel's vhost-net side by side"
    );
    match integration_tests::nested::bench::iotlb_figure() {
        Ok(f) => print!("{}", f.table()),
        Err(e) => println!("  skipped: {e}", e = chain(&e)),
    }
}

fn print_cells(results: &[CellResult], tsc_khz: u64) {
    println!(
        "\n== DMA through vhost-user virtio-net ({} frames each; miss = MISS->UPDATE at the backend, us p50/p99)",
        results.first().map(|r| r.cell.frames).unwrap_or(0)
    );
    println!(
        "  {:13} {:14} {:5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>13} {:>10}",
        "vIOMMU",
        "mode",
        "back",
        "frames/s",
        "miss/f",
        "upd/f",
        "inv/f",
        "ring inv",
        "miss us",
        "inv rtt us"
    );
    for r in results {
        let s = &r.outcome.stats;
        let rtt = s.iotlb.rtt_total_ns as f64 / s.iotlb.acked.max(1) as f64 / 1000.0;
        println!(
            "  {:13} {:14} {:5} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>13} {:>10.1}",
            viommu_name(r.cell.viommu),
            mode_name(&r.cell),
            match r.backend {
                BenchBackend::Own => "own",
                BenchBackend::Dpdk => "dpdk",
            },
            r.frames_per_sec(tsc_khz),
            r.per_frame(s.bridge.misses),
            r.per_frame(s.iotlb.updates),
            r.per_frame(s.iotlb.invalidations),
            s.bridge.ring_invalidations,
            fmt_latency(r.outcome.backend_miss_latency.as_ref()),
            rtt,
        );
    }
}

fn qemu_runs(frames: u64, qemu: &QemuBinary, version: &str) -> Vec<QemuRun> {
    let mut runs = Vec::new();
    for (iommu, mode) in [
        (QemuIommu::IntelIommu, GuestMode::Strict),
        (QemuIommu::IntelIommu, GuestMode::Lazy),
        (QemuIommu::IntelIommu, GuestMode::Passthrough),
        (QemuIommu::VirtioIommu, GuestMode::Strict),
    ] {
        let mut cfg = QemuConfig::new(iommu, mode, QemuBackend::Own).with_qemu(qemu.clone());
        cfg.frames = frames;
        cfg.timeout = Duration::from_secs(600);
        match qemu::run(&cfg) {
            Ok(r) => runs.push(r),
            Err(e) => println!("  QEMU {version} {iommu:?} {mode:?}: {e}", e = chain(&e)),
        }
    }
    runs
}

fn ours(results: &[CellResult], iommu: QemuIommu, mode: GuestMode) -> Option<&CellResult> {
    let v = match iommu {
        QemuIommu::IntelIommu => Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
        QemuIommu::VirtioIommu => Viommu::Virtio,
    };
    let m = match mode {
        GuestMode::Strict => IommuMode::Strict,
        GuestMode::Lazy => IommuMode::Lazy,
        GuestMode::Passthrough => IommuMode::Passthrough,
    };
    results.iter().find(|r| {
        r.cell.viommu == v && r.cell.mode == m && !r.cell.prefetch && r.backend == BenchBackend::Own
    })
}

fn ratio(q: f64, o: f64) -> String {
    if o <= 0.0 {
        return if q > 0.0 { "inf".into() } else { "-".into() };
    }
    format!("{:.1}x", q / o)
}

fn print_qemu(version: &str, runs: &[QemuRun], results: &[CellResult], iovmm_rss: Option<u64>) {
    println!(
        "\n== QEMU {version} (TCG, Debian 6.12 guest, own backend) vs iovmm, same run ({})",
        runs.first().map_or_else(
            || "no run succeeded".to_string(),
            |r| r.config.qemu.path.display().to_string()
        )
    );
    println!(
        "  {:8} {:12} {:11} {:>7} {:>7} {:>7} {:>13} {:>9} | {:>9} {:>9} {:>9}",
        "QEMU",
        "vIOMMU",
        "mode",
        "miss/f",
        "upd/f",
        "inv/f",
        "miss us",
        "RSS MiB",
        "miss/f",
        "inv/f",
        "miss p50"
    );
    for q in runs {
        let c = q.iotlb.unwrap_or(qemu::IotlbCounts {
            misses: 0,
            updates: 0,
            invalidates: 0,
        });
        let (qm, qu, qi) = (
            q.per_frame(c.misses),
            q.per_frame(c.updates),
            q.per_frame(c.invalidates),
        );
        let o = ours(results, q.config.iommu, q.config.mode);
        let (om, oi, op50) = o
            .map(|r| {
                let s = &r.outcome.stats;
                let p50 = r
                    .outcome
                    .backend_miss_latency
                    .as_ref()
                    .map(|l| us(l.p50))
                    .unwrap_or(0.0);
                (
                    r.per_frame(s.bridge.misses),
                    r.per_frame(s.iotlb.invalidations),
                    p50,
                )
            })
            .unwrap_or((0.0, 0.0, 0.0));
        let qp50 = q.miss_latency.as_ref().map(|l| us(l.p50)).unwrap_or(0.0);
        println!(
            "  {:8} {:12} {:11} {:>7.3} {:>7.3} {:>7.3} {:>13} {:>9.1} | {:>9} {:>9} {:>9}",
            q.qemu_version,
            format!("{:?}", q.config.iommu),
            format!("{:?}", q.config.mode),
            qm,
            qu,
            qi,
            fmt_latency(q.miss_latency.as_ref()),
            q.vm_hwm_kib as f64 / 1024.0,
            ratio(qm, om),
            ratio(qi, oi),
            ratio(qp50, op50),
        );
    }
    if let (Some(rss), Some(q)) = (iovmm_rss, runs.first()) {
        println!(
            "  RSS: QEMU {} {} KiB vs iovmm {rss} KiB ({})",
            q.qemu_version,
            q.vm_hwm_kib,
            ratio(q.vm_hwm_kib as f64, rss as f64)
        );
    }
    println!("  (ratios are QEMU / iovmm: above 1x means iovmm sends fewer messages or is faster)");
}

fn run_poll_ab(args: &Args, tsc_khz: u64) {
    let cells: Vec<Cell> = bench_cells(args.frames.unwrap_or(FRAMES), args.size, tsc_khz)
        .into_iter()
        .filter(|c| matches!(c.mode, IommuMode::Strict | IommuMode::Lazy) && !c.prefetch)
        .filter(|c| {
            args.only
                .as_deref()
                .is_none_or(|o| viommu_name(c.viommu).contains(o))
        })
        .collect();
    let mut backends = vec![BenchBackend::Own];
    if !args.no_dpdk {
        backends.push(BenchBackend::Dpdk);
    }
    let failures = integration_tests::bench::poll::poll_ab(
        &cells,
        &backends,
        &args.poll_ab,
        args.poll_reps.max(1),
        tsc_khz,
    );
    for f in &failures {
        println!("  FAILED {f}");
    }
}

fn print_mq_table(args: &Args, tsc_khz: u64) {
    use integration_tests::bench::mq::{mq_cells, print_mq, run_mq};
    let cells: Vec<_> = mq_cells(args.frames.unwrap_or(FRAMES), args.size)
        .into_iter()
        .filter(|c| args.only.as_deref().is_none_or(|o| c.viommu.contains(o)))
        .collect();
    let results: Vec<_> = cells.iter().map(|c| run_mq(c, tsc_khz)).collect();
    print_mq(&results, &cells);
}

fn main() {
    let args = Args::parse();
    env_logger::init();
    std::env::set_var("IOVMM_MATRIX_QUIET", "1");
    let tsc_khz = host_tsc_khz();
    println!("iovmm-bench: TSC {tsc_khz} kHz");
    if let Some(runs) = args.soak {
        let ok = run_soak(&args, runs, tsc_khz);
        std::process::exit(if ok { 0 } else { 1 });
    }
    if args.nested_iotlb_only {
        return print_nested_iotlb();
    }
    if args.memory_only {
        return print_memory(args.memory_reps);
    }
    if args.mq_only {
        return print_mq_table(&args, tsc_khz);
    }
    let floors = (!args.no_floors).then(|| {
        let f = Floors::measure(args.floor_iterations, tsc_khz);
        f.print();
        f
    });
    if args.floors_only {
        return;
    }
    if !args.poll_ab.is_empty() {
        return run_poll_ab(&args, tsc_khz);
    }
    print_boot_and_rss(&args);
    if !args.no_memory {
        print_memory(args.memory_reps);
    }
    if args.nested_boots > 0 {
        print_nested_boot(args.nested_boots);
    }
    if !args.no_nested_iotlb {
        print_nested_iotlb();
    }
    let mut results = Vec::new();
    let wanted = |c: &integration_tests::matrix::Cell| {
        args.only
            .as_deref()
            .is_none_or(|o| viommu_name(c.viommu).contains(o))
    };
    let mut failures = Vec::new();
    let cells = bench_cells(args.frames.unwrap_or(FRAMES), args.size, tsc_khz);
    for cell in cells.into_iter().filter(wanted) {
        let mut backends = vec![BenchBackend::Own];
        if !args.no_dpdk {
            backends.push(BenchBackend::Dpdk);
        }
        for b in backends {
            match run_cell(cell, b) {
                Ok(r) => results.push(r),
                Err(e) => failures.push(format!(
                    "{} {} {b:?}: {e}",
                    viommu_name(cell.viommu),
                    cell.mode.as_str()
                )),
            }
        }
    }
    print_cells(&results, tsc_khz);
    if let Some(f) = &floors {
        print_floor_ratios(&results, f, tsc_khz);
    }
    if !args.no_mq {
        print_mq_table(&args, tsc_khz);
    }
    if !args.no_rx {
        failures.extend(integration_tests::bench::rx::rx_bench(
            args.frames.unwrap_or(FRAMES),
            args.size,
            tsc_khz,
            !args.no_dpdk,
            args.only.as_deref(),
        ));
    }
    if !args.no_blk {
        failures.extend(integration_tests::blk::bench::blk_bench(
            tsc_khz,
            true,
            args.only.as_deref(),
        ));
    }
    for f in &failures {
        println!("  FAILED {f}");
    }
    if args.no_qemu {
        return;
    }
    let iovmm_rss = sibling_binary("iovmm-cli")
        .and_then(|b| integration_tests::bench::memory::hello(&b).ok())
        .map(|m| m.vm_hwm);
    let qemus: Vec<(QemuBinary, String)> = reference_qemus()
        .into_iter()
        .filter(|(_, v)| {
            args.qemu_version
                .as_deref()
                .is_none_or(|want| v.starts_with(want))
        })
        .collect();
    if qemus.is_empty() {
        println!(
            "\n== QEMU: none found{} (resources/install-deps.sh --with-qemu, resources/fetch-qemu72.sh)",
            args.qemu_version
                .as_deref()
                .map_or(String::new(), |v| format!(" with version {v}*"))
        );
    }
    for (qemu, version) in &qemus {
        let runs = qemu_runs(args.qemu_frames, qemu, version);
        print_qemu(version, &runs, &results, iovmm_rss);
    }
}
