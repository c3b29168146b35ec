//! virtio-blk cells: the fast test guest's `blk` scenario (GET_ID, a pattern written over the
//! whole disk with several requests in flight, FLUSH, read back and verified) through iovmm's
//! vhost-user blk frontend, served by our own backend (`--blk`, IOTLB-aware, behind either
//! vIOMMU in every guest mode) or by qemu-storage-daemon's `vhost-user-blk` export (libvhost-user,
//! no IOTLB, so only without a vIOMMU). The harness checks the guest's verdict, the backend's
//! counters and, independently, every byte of the disk image.

pub mod bench;
pub mod stale;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iommu::sync::lock;
use vmm::{VhostUserStats, VmConfig, Vmm};

use crate::backend::blk::{BlkConfig, BlkSnapshot};
use crate::backend::{BackendConfig, CountersSnapshot, TestBackend};
use crate::guest::{AtsMode, GuestResult, IommuMode, Scenario};
use crate::matrix::{
    assert_connection_invalidates, assert_invalidates_honoured, cell_vm, temp_path, Viommu, VmRun,
    MISS_TIMEOUT, ONE_CELL,
};

/// How long a blk cell's guest may run.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The qemu-storage-daemon binary (Debian package qemu-utils).
pub const QSD: &str = "qemu-storage-daemon";
/// The guest's pattern seed (`iovmm.seed`, default 1).
const SEED: u64 = 1;

/// A blk cell.
#[derive(Debug, Clone, Copy)]
pub struct BlkCell {
    /// vIOMMU (`Viommu::None`: the device is not behind one).
    pub viommu: Viommu,
    /// Guest IOMMU mode.
    pub mode: IommuMode,
    /// Guest ATS choice (VT-d).
    pub ats: AtsMode,
    /// Bytes per request.
    pub size: u64,
    /// Requests in flight.
    pub inflight: u64,
    /// Disk size in bytes (the guest covers all of it in each phase).
    pub disk_bytes: u64,
    /// Also read one sector past the end, which must fail with IOERR.
    pub bad_sector: bool,
    /// Also read into a buffer mapped read-only (strict/lazy): the backend's write must be
    /// refused (the backend sets NEED_REPLY on misses to learn it at once), IOERR, buffer intact.
    pub ro_read: bool,
    /// Host TSC rate for the guest's timing, if known.
    pub tsc_khz: Option<u64>,
}

impl BlkCell {
    /// 4 KiB requests, 8 in flight, a 1 MiB disk, with the out-of-range read.
    pub fn new(viommu: Viommu, mode: IommuMode) -> Self {
        BlkCell {
            viommu,
            mode,
            ats: AtsMode::Auto,
            size: 4096,
            inflight: 8,
            disk_bytes: 1 << 20,
            bad_sector: true,
            ro_read: false,
            tsc_khz: None,
        }
    }

    /// Requests per phase (the whole disk).
    pub fn requests(&self) -> u64 {
        self.disk_bytes / self.size
    }

    fn tag(&self, backend: &str) -> String {
        format!(
            "blk-{backend}-{:?}-{}-{}-{}",
            self.viommu,
            self.mode.as_str(),
            self.ats.as_str(),
            self.size
        )
        .replace([' ', '{', '}', ':', ','], "")
    }

    /// The VM: the test guest running `blk`, one vhost-user blk device on `sock`.
    pub fn vm_config(&self, sock: &Path) -> VmConfig {
        let s = Scenario::blk(self.size, self.inflight)
            .iommu(self.mode)
            .param("bad_sector", u64::from(self.bad_sector))
            .param("ro_read", u64::from(self.ro_read));
        self.vm_config_for(sock, s)
    }

    /// The VM: the test guest running scenario `s` (with the cell's ATS choice and TSC rate),
    /// one vhost-user blk device on `sock`.
    pub fn vm_config_for(&self, sock: &Path, s: Scenario) -> VmConfig {
        cell_vm(
            self.viommu,
            false,
            "blk",
            sock,
            s.ats(self.ats),
            self.tsc_khz,
        )
    }
}

/// A zero-filled disk image of `bytes` at a fresh path, in RAM (`/dev/shm`) when there is one:
/// the cells measure the vhost-user path, not the host's disk (whose dirty-page throttling and
/// fdatasync on a loaded machine held requests for seconds).
pub fn disk_image(tag: &str, bytes: u64) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("iovmm-{}-{tag}.img", std::process::id()));
    let f = std::fs::File::create(&path).expect("create disk image");
    f.set_len(bytes).expect("size disk image");
    path
}

/// The guest's pattern word at disk byte offset `off`.
pub fn pattern(off: u64, seed: u64) -> u64 {
    (off + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// Checks every 8-byte word of the image against the guest's pattern; returns the first bad
/// offset.
pub fn first_bad_word(image: &Path, seed: u64) -> Option<u64> {
    let data = std::fs::read(image).expect("read disk image");
    data.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let off = 8 * i as u64;
        let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
        (v != pattern(off, seed)).then_some(off)
    })
}

/// What a blk cell produced.
#[derive(Debug)]
pub struct BlkOutcome {
    /// The guest's result line.
    pub result: GuestResult,
    /// iovmm's counters for the device.
    pub stats: VhostUserStats,
    /// Our backend's protocol counters (own-backend cells).
    pub backend: Option<CountersSnapshot>,
    /// Our backend's blk counters (own-backend cells).
    pub blk: Option<BlkSnapshot>,
}

impl BlkOutcome {
    /// vhost-user IOTLB messages (MISS, UPDATE, INVALIDATE) per request, both phases counted.
    pub fn messages_per_request(&self) -> f64 {
        let reqs = 2 * self.result.u64("requests").unwrap_or(0);
        let s = &self.stats;
        let msgs = s.bridge.misses + s.iotlb.updates + s.iotlb.invalidations;
        msgs as f64 / reqs.max(1) as f64
    }
}

/// Boots the guest against the backend on `sock` and checks its verdict.
pub fn run_guest(cell: &BlkCell, sock: &Path) -> (GuestResult, VhostUserStats) {
    let run = VmRun::boot(cell, &cell.vm_config(sock), RUN_TIMEOUT);
    let (r, serial) = (run.ok_result(cell), &run.serial);
    let n = cell.requests();
    assert_eq!(r.u64("requests"), Some(n), "{serial}");
    assert_eq!(r.u64("completed"), Some(2 * n), "{serial}");
    assert_eq!(r.u64("capacity"), Some(cell.disk_bytes / 512), "{serial}");
    assert_eq!(
        (r.u64("errors"), r.u64("mismatches"), r.u64("flushed")),
        (Some(0), Some(0), Some(1)),
        "{serial}"
    );
    if cell.bad_sector {
        assert_eq!(r.u64("bad_sector_status"), Some(1), "IOERR; {serial}");
    }
    if cell.ro_read {
        assert_eq!(r.u64("ro_read_status"), Some(1), "IOERR; {serial}");
        assert_eq!(r.u64("ro_read_intact"), Some(1), "{serial}");
    }
    (r, run.stats)
}

/// Runs `cell` against our own backend in blk mode.
pub fn run_own_backend(cell: &BlkCell) -> BlkOutcome {
    let _one = lock(&ONE_CELL);
    let tag = cell.tag("own");
    let image = disk_image(&tag, cell.disk_bytes);
    let sock = temp_path(&tag, "sock");
    let config = BackendConfig {
        access_platform: cell.viommu != Viommu::None,
        miss_timeout: MISS_TIMEOUT,
        miss_need_reply: cell.ro_read,
        blk: Some(BlkConfig::new(&image)),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let (result, stats) = run_guest(cell, &sock);
    assert_eq!(result.str("serial"), Some("iovmm-test-blk"));
    let n = cell.requests();
    let blk = backend.blk_counters().expect("blk counters");
    assert_eq!(
        (blk.writes, blk.reads, blk.flushes, blk.get_ids),
        (n, n, 1, 1)
    );
    assert_eq!(
        blk.ioerrs,
        u64::from(cell.bad_sector) + u64::from(cell.ro_read)
    );
    assert_eq!(blk.bytes_written, cell.disk_bytes);
    assert_eq!(blk.status_lost, 0);
    let c = backend.counters();
    assert_eq!(c.translation_failures, u64::from(cell.ro_read));
    assert_invalidates_honoured(&backend);
    assert_eq!(first_bad_word(&image, SEED), None, "disk image content");
    assert_connection_invalidates(cell.viommu != Viommu::None, &stats);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&sock);
    BlkOutcome {
        result,
        stats,
        backend: Some(c),
        blk: Some(blk),
    }
}

/// A qemu-storage-daemon exporting one image as vhost-user-blk; killed on drop.
pub struct StorageDaemon {
    pid: i32,
    pidfile: PathBuf,
}

impl StorageDaemon {
    /// Starts it daemonized: `--daemonize` returns once the export listens on `sock`.
    pub fn start(image: &Path, sock: &Path) -> Result<Self, String> {
        let pidfile = sock.with_extension("pid");
        let _ = std::fs::remove_file(sock);
        let out = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&pidfile)
            .output()
            .map_err(|e| format!("cannot run {QSD}: {e}; install it with `bash resources/install-deps.sh --with-qemu` (package qemu-utils)"))?;
        if !out.status.success() {
            return Err(format!(
                "{QSD} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("{QSD} wrote no pid file"))?;
        Ok(StorageDaemon { pid, pidfile })
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        // SAFETY: signals the daemon this struct started (its pid from its own pid file).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks whether the process still exists.
        while unsafe { libc::kill(self.pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Runs `cell` (no vIOMMU) against qemu-storage-daemon.
pub fn run_qsd(cell: &BlkCell) -> BlkOutcome {
    let _one = lock(&ONE_CELL);
    let tag = cell.tag("qsd");
    let image = disk_image(&tag, cell.disk_bytes);
    let sock = temp_path(&tag, "sock");
    let daemon = StorageDaemon::start(&image, &sock).expect("qemu-storage-daemon starts");
    let (result, stats) = run_guest(cell, &sock);
    drop(daemon);
    assert_eq!(first_bad_word(&image, SEED), None, "disk image content");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&sock);
    BlkOutcome {
        result,
        stats,
        backend: None,
        blk: None,
    }
}

/// Starts a VM with `cell` against qemu-storage-daemon and returns the start error.
pub fn qsd_start_error(cell: &BlkCell) -> String {
    let _one = lock(&ONE_CELL);
    let tag = cell.tag("qsd-err");
    let image = disk_image(&tag, cell.disk_bytes);
    let sock = temp_path(&tag, "sock");
    let _daemon = StorageDaemon::start(&image, &sock).expect("qemu-storage-daemon starts");
    let res = Vmm::start(&cell.vm_config(&sock));
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&sock);
    match res {
        Ok(_) => panic!("iovmm started a blk device behind a vIOMMU on qemu-storage-daemon"),
        Err(e) => {
            // The whole chain, as the CLI prints it.
            iommu::error::chain(&e).to_string()
        }
    }
}
