//! The fast test guest (`tests/guest`): where its ELF is, how to tell it what to run, and how to
//! read the one `IOVMM-RESULT {...}` line it prints before exiting through the exit port.
//!
//! The guest is built by `tests/build.rs` with the system gcc. Its ring-0 part only sets up
//! descriptor tables and page tables, then the scenario runs in ring 3 (native speed under
//! kvm-pvm). The scenario comes from the kernel command line, e.g.
//! `iovmm.test=net-tx iovmm.frames=1000 iovmm.size=1500`, which [`Scenario`] builds.

use std::fmt::{self, Display};
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

mod dma;

pub use dma::DmaStats;

/// Exit code of a scenario that passed.
pub const EXIT_OK: i32 = 0;
/// Exit code of a scenario that ran and found a failure (timeout, wrong data, device error).
pub const EXIT_FAILED: i32 = 1;
/// Exit code for a missing or malformed `iovmm.*` parameter.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the scenario needs a device or feature that is absent or not implemented.
pub const EXIT_UNSUPPORTED: i32 = 3;
/// A CPU exception ends the guest with this code plus the vector.
pub const EXIT_EXCEPTION_BASE: i32 = 0x40;
/// The page-fault vector (the `fault` scenario triggers one from ring 3).
pub const PAGE_FAULT_VECTOR: u8 = 14;
/// The prefix of the guest's result line on the serial console.
pub const RESULT_PREFIX: &str = "IOVMM-RESULT ";
/// Longest command line the guest reads (bytes, without the NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;

/// The guest's exit code when CPU exception `vector` ended it.
pub const fn exception_exit_code(vector: u8) -> i32 {
    EXIT_EXCEPTION_BASE + (vector & 0x1f) as i32
}

/// Path of the test guest ELF built for this test binary.
pub fn test_guest_path() -> &'static Path {
    Path::new(env!("IOVMM_TEST_GUEST"))
}

/// Errors of the guest helpers: building a command line or reading a result line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuestError {
    /// A scenario name or parameter would not survive the whitespace-split command line.
    #[error("invalid guest parameter {key:?}={value:?}: keys and values must be non-empty, without whitespace, and keys without '='")]
    InvalidParam {
        /// The parameter key (without the `iovmm.` prefix).
        key: String,
        /// Its value.
        value: String,
    },
    /// The command line would be cut by the guest.
    #[error("guest command line is {len} bytes, the guest reads at most {MAX_CMDLINE_LEN}; drop parameters")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The output has no result line: the guest died before reporting, or the output is truncated.
    #[error("no `IOVMM-RESULT` line in the guest output; check the serial log for IOVMM-EXCEPTION or a VMM error")]
    NoResultLine,
    /// The guest printed more than one result line (it prints exactly one).
    #[error("{count} `IOVMM-RESULT` lines in the guest output, expected exactly one")]
    MultipleResultLines {
        /// How many were found.
        count: usize,
    },
    /// The result line is not a flat JSON object.
    #[error("malformed result JSON: {what}")]
    Syntax {
        /// Column (1-based) of the JSON text where the parser stopped.
        column: usize,
        /// What was wrong or expected there, and where (serde_json's message).
        what: String,
    },
    /// A key appears twice in the result object.
    #[error("duplicate key {0:?} in the result JSON")]
    DuplicateKey(String),
    /// A field the caller needs is absent or has the wrong type.
    #[error("result field {0:?} is missing or not of the expected type; is the guest older than the test?")]
    MissingField(&'static str),
}

/// The IOMMU mode the guest's DMA layer uses (like Linux's `iommu.passthrough` / `iommu.strict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuMode {
    /// No vIOMMU programming; device addresses are guest physical addresses.
    Off,
    /// The device's domain is identity-mapped / bypassed.
    Passthrough,
    /// Map and unmap (with synchronous invalidation) around every buffer.
    Strict,
    /// Map every buffer, batch the unmaps and flush periodically.
    Lazy,
}

impl IommuMode {
    /// Every mode, in `iovmm.iommu` order.
    pub const ALL: [IommuMode; 4] = [
        IommuMode::Off,
        IommuMode::Passthrough,
        IommuMode::Strict,
        IommuMode::Lazy,
    ];

    /// The value of `iovmm.iommu=` (also the result line's `iommu_mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            IommuMode::Off => "off",
            IommuMode::Passthrough => "passthrough",
            IommuMode::Strict => "strict",
            IommuMode::Lazy => "lazy",
        }
    }

    /// The mode named `s` (as printed by the guest), if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// Which vIOMMU the guest's DMA layer programs (`iovmm.viommu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViommuKind {
    /// Whichever is found: a virtio-iommu on PCI bus 0 first, else a VT-d unit.
    Auto,
    /// The virtio-iommu (PCI 1af4:1057).
    Virtio,
    /// The VT-d remapping unit (DMAR table, else 0xfed90000).
    Vtd,
}

impl ViommuKind {
    /// The value of `iovmm.viommu=`.
    pub fn as_str(self) -> &'static str {
        match self {
            ViommuKind::Auto => "auto",
            ViommuKind::Virtio => "virtio",
            ViommuKind::Vtd => "vtd",
        }
    }

    /// The guest's driver name in the result line's `viommu` field (`none` for no vIOMMU).
    pub fn driver_name(self) -> Option<&'static str> {
        match self {
            ViommuKind::Auto => None,
            ViommuKind::Virtio => Some("virtio-iommu"),
            ViommuKind::Vtd => Some("vt-d"),
        }
    }
}

/// Whether the guest enables PCIe ATS on the DMA device (`iovmm.ats`; VT-d only, like Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtsMode {
    /// Enable it when the device has the capability (with Page Aligned Request) and ECAP.DT=1.
    Auto,
    /// Like `Auto`, but the run is `unsupported` (exit 3) if ATS cannot be enabled.
    On,
    /// Leave the capability disabled (context TT=0, no device-TLB invalidations).
    Off,
}

impl AtsMode {
    /// The value of `iovmm.ats=`.
    pub fn as_str(self) -> &'static str {
        match self {
            AtsMode::Auto => "auto",
            AtsMode::On => "on",
            AtsMode::Off => "off",
        }
    }
}

/// How a lazy-mode flush invalidates on VT-d (`iovmm.lazy_flush`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyFlush {
    /// One domain-selective IOTLB flush (+ whole device-TLB) per batch, like Linux.
    Domain,
    /// One page-selective flush (+ device-TLB) per deferred unmap, one wait per batch.
    Pages,
}

impl LazyFlush {
    /// The value of `iovmm.lazy_flush=`.
    pub fn as_str(self) -> &'static str {
        match self {
            LazyFlush::Domain => "domain",
            LazyFlush::Pages => "pages",
        }
    }
}

/// virtio-iommu feature bit PROBE, for [`Scenario::viommu_withhold`].
pub const VIRTIO_IOMMU_F_PROBE: u64 = 1 << 4;
/// virtio-iommu feature bit BYPASS_CONFIG, for [`Scenario::viommu_withhold`].
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u64 = 1 << 6;

/// Longest lazy batch the guest accepts (`iovmm.lazy_batch`).
pub const MAX_LAZY_BATCH: u64 = 4096;
/// Most buffers the `dma-map` scenario keeps mapped at once (`iovmm.inflight`).
pub const MAX_INFLIGHT: u64 = 256;

/// A guest scenario and its `iovmm.*` parameters; [`Scenario::cmdline`] renders the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    test: String,
    params: Vec<(String, String)>,
}

impl Scenario {
    /// A scenario by name (`hello`, `fault`, `tsc`, `pci-scan`, `net-tx`, ...).
    pub fn new(test: impl Into<String>) -> Self {
        Scenario {
            test: test.into(),
            params: Vec::new(),
        }
    }

    /// Prints `IOVMM-TEST hello ok` and exits 0.
    pub fn hello() -> Self {
        Self::new("hello")
    }

    /// Page-faults in ring 3; the guest exits with `exception_exit_code(PAGE_FAULT_VECTOR)`.
    pub fn fault() -> Self {
        Self::new("fault")
    }

    /// Times a 10M-iteration loop with RDTSC (`iterations` overrides the count).
    pub fn tsc() -> Self {
        Self::new("tsc")
    }

    /// Lists the functions on PCI bus 0 with their BARs.
    pub fn pci_scan() -> Self {
        Self::new("pci-scan")
    }

    /// Transmits `frames` frames of `size` bytes on the first virtio-net device.
    pub fn net_tx(frames: u64, size: u64) -> Self {
        Self::new("net-tx").frames(frames).size(size)
    }

    /// Multiqueue transmit (`net-mq`, `tests/guest/netmq.c`): VQ_PAIRS_SET(`queues`) on the
    /// control queue, then `frames` frames of `size` bytes round-robin on the first `queues`
    /// transmit queues; the result has `tx0`.. per queue pair and net-tx's `checksum`.
    pub fn net_mq(frames: u64, size: u64, queues: u64) -> Self {
        Self::new("net-mq")
            .frames(frames)
            .size(size)
            .param("queues", queues)
    }

    /// Maps and unmaps `iterations` rounds of buffers of `size` bytes for one PCI function without
    /// device DMA (exercises the vIOMMU driver; default mode strict).
    pub fn dma_map(iterations: u64, size: u64) -> Self {
        Self::new("dma-map").iterations(iterations).size(size)
    }

    /// Reads the first virtio-blk disk's id, writes a pattern over the whole disk in requests of
    /// `size` bytes with `inflight` of them in flight, flushes, reads it back and verifies it.
    pub fn blk(size: u64, inflight: u64) -> Self {
        Self::new("blk").size(size).param("inflight", inflight)
    }

    /// Times `iterations` ring-3 `out`s to and `in`s from a port no device claims, as many
    /// CPUIDs (handled by KVM) and, with `mmio`, MMIO writes to that guest-physical address
    /// (outside RAM, no device): guest exits answered without device work (`exit-bench`, see
    /// `tests/guest/exitbench.c`).
    pub fn exit_bench(iterations: u64, mmio: Option<u64>) -> Self {
        let s = Self::new("exit-bench").iterations(iterations);
        match mmio {
            Some(addr) => s.param("mmio", format!("{addr:#x}")),
            None => s,
        }
    }

    /// The scenario name.
    pub fn test(&self) -> &str {
        &self.test
    }

    /// Sets `iovmm.<key>=<value>`, replacing an earlier value of the same key.
    pub fn param(mut self, key: &str, value: impl Display) -> Self {
        let value = value.to_string();
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
        self
    }

    /// Number of frames (`iovmm.frames`).
    pub fn frames(self, n: u64) -> Self {
        self.param("frames", n)
    }

    /// Frame size in bytes without the virtio-net header (`iovmm.size`, 60..65000).
    pub fn size(self, bytes: u64) -> Self {
        self.param("size", bytes)
    }

    /// Frames added to the ring per notification (`iovmm.batch`).
    pub fn batch(self, n: u64) -> Self {
        self.param("batch", n)
    }

    /// Upper bound of the transmit queue size (`iovmm.queue`).
    pub fn queue_size(self, n: u64) -> Self {
        self.param("queue", n)
    }

    /// How long the guest waits for progress before reporting a timeout (`iovmm.timeout_ms`).
    pub fn timeout_ms(self, ms: u64) -> Self {
        self.param("timeout_ms", ms)
    }

    /// The host TSC rate, so the guest can turn timeouts into cycles and report it
    /// (`iovmm.tsc_khz`; CPUID does not tell it on AMD hosts).
    pub fn tsc_khz(self, khz: u64) -> Self {
        self.param("tsc_khz", khz)
    }

    /// The DMA layer's IOMMU mode (`iovmm.iommu`).
    pub fn iommu(self, mode: IommuMode) -> Self {
        self.param("iommu", mode.as_str())
    }

    /// Which vIOMMU to program (`iovmm.viommu`).
    pub fn viommu(self, kind: ViommuKind) -> Self {
        self.param("viommu", kind.as_str())
    }

    /// ATS on the DMA device (`iovmm.ats`).
    pub fn ats(self, mode: AtsMode) -> Self {
        self.param("ats", mode.as_str())
    }

    /// Deferred unmaps per lazy flush (`iovmm.lazy_batch`, 1..=[`MAX_LAZY_BATCH`]; default 256).
    pub fn lazy_batch(self, n: u64) -> Self {
        self.param("lazy_batch", n)
    }

    /// How VT-d lazy flushes invalidate (`iovmm.lazy_flush`).
    pub fn lazy_flush(self, flush: LazyFlush) -> Self {
        self.param("lazy_flush", flush.as_str())
    }

    /// virtio-iommu feature bits the guest must not accept (`iovmm.viommu_withhold`), e.g.
    /// [`VIRTIO_IOMMU_F_BYPASS_CONFIG`] to get Linux's identity-domain passthrough (1:1 MAPs).
    pub fn viommu_withhold(self, feature_bits: u64) -> Self {
        self.param("viommu_withhold", format!("{feature_bits:#x}"))
    }

    /// net-tx queues frame `n` (0-based) at a guard IOVA that is never mapped (`iovmm.bad_frame`,
    /// strict/lazy only): the device's read must fault, the run ends `failed`, and the result
    /// carries `bad_iova` and the vIOMMU's fault fields.
    pub fn bad_frame(self, n: u64) -> Self {
        self.param("bad_frame", n)
    }

    /// Receives `frames` sequence frames of `size` bytes on the first virtio-net device into
    /// device-writable buffers and verifies them (`net-rx`, see `tests/guest/rx.c`).
    pub fn net_rx(frames: u64, size: u64) -> Self {
        Self::new("net-rx").frames(frames).size(size)
    }

    /// `net-rx` that transmits the frames itself and expects them back (`iovmm.loopback`).
    pub fn loopback(self, on: bool) -> Self {
        self.param("loopback", u8::from(on))
    }

    /// Map RX buffers read-write (`iovmm.rx_dir=rw`, DMA_BIDIRECTIONAL) instead of write-only.
    pub fn rx_read_write(self, on: bool) -> Self {
        self.param("rx_dir", if on { "rw" } else { "w" })
    }

    /// The use-after-unmap probe (`net-stale`, strict): a TX descriptor at an unmapped IOVA
    /// carrying the marker frame, then `after` normal frames.
    pub fn net_stale(size: u64, after: u64) -> Self {
        Self::new("net-stale")
            .size(size)
            .param("after", after)
            .iommu(IommuMode::Strict)
    }

    /// The virtio-blk use-after-unmap probe (`blk-stale`, strict; see `tests/guest/blk.c`): a
    /// normal write and read of `size` bytes, their buffers unmapped, then two writes (one of them
    /// from a marker buffer) and a read at the stale IOVAs, which must fail with IOERR, then
    /// normal requests again.
    pub fn blk_stale(size: u64) -> Self {
        Self::new("blk-stale").size(size).iommu(IommuMode::Strict)
    }

    /// `net-stale`: accept a stale descriptor that never completes (DPDK), waiting `ms`.
    pub fn expect_stall(self, ms: u64) -> Self {
        self.param("expect_stall", 1).param("stale_wait_ms", ms)
    }

    /// Loop count of `tsc` and `dma-map` (`iovmm.iterations`).
    pub fn iterations(self, n: u64) -> Self {
        self.param("iterations", n)
    }

    /// Buffers mapped at once per `dma-map` round (`iovmm.inflight`, 1..=[`MAX_INFLIGHT`]).
    pub fn inflight(self, n: u64) -> Self {
        self.param("inflight", n)
    }

    /// The PCI function `dma-map` maps for (`iovmm.bdf=BB:DD.F`); device and function are masked
    /// to 5 and 3 bits.
    pub fn bdf(self, bus: u8, device: u8, function: u8) -> Self {
        self.param(
            "bdf",
            format!("{bus:02x}:{:02x}.{:x}", device & 0x1f, function & 7),
        )
    }

    /// The kernel command line: `iovmm.test=<name>` followed by the parameters in the order set.
    pub fn cmdline(&self) -> Result<String, GuestError> {
        check_param("test", &self.test)?;
        let mut line = format!("iovmm.test={}", self.test);
        for (key, value) in &self.params {
            check_param(key, value)?;
            line.push_str(&format!(" iovmm.{key}={value}"));
        }
        if line.len() > MAX_CMDLINE_LEN {
            return Err(GuestError::CmdlineTooLong { len: line.len() });
        }
        Ok(line)
    }
}

fn check_param(key: &str, value: &str) -> Result<(), GuestError> {
    let bad = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad(key) || bad(value) || key.contains('=') {
        return Err(GuestError::InvalidParam {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Parses the guest's flat JSON object (string keys; string, number, boolean or null values).
/// A repeated key is an error, not "last one wins".
pub fn parse_flat_json(text: &str) -> Result<Map<String, Value>, GuestError> {
    let mut duplicate = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = FlatObject {
        duplicate: &mut duplicate,
    }
    .deserialize(&mut de)
    .and_then(|fields| de.end().map(|()| fields));
    match (parsed, duplicate) {
        (_, Some(key)) => Err(GuestError::DuplicateKey(key)),
        (Ok(fields), None) => Ok(fields),
        (Err(e), None) => Err(GuestError::Syntax {
            column: e.column(),
            what: e.to_string(),
        }),
    }
}

/// Deserializes a flat object, recording the first repeated key in `duplicate`.
struct FlatObject<'a> {
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for FlatObject<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FlatObject<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a flat JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if value.is_object() || value.is_array() {
                return Err(de::Error::custom(format!(
                    "value of {key:?} is not a string, number, boolean or null"
                )));
            }
            if fields.contains_key(&key) {
                *self.duplicate = Some(key);
                return Err(de::Error::custom("duplicate key"));
            }
            fields.insert(key, value);
        }
        Ok(fields)
    }
}

/// The guest's `IOVMM-RESULT` line as a key/value map.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestResult {
    fields: Map<String, Value>,
}

impl GuestResult {
    /// Finds the single result line in the guest's serial output and parses it.
    pub fn from_output(output: &str) -> Result<Self, GuestError> {
        let lines: Vec<&str> = output
            .lines()
            .filter_map(|l| l.find(RESULT_PREFIX).map(|i| &l[i..]))
            .collect();
        match lines.as_slice() {
            [] => Err(GuestError::NoResultLine),
            [line] => Self::parse_line(line),
            _ => Err(GuestError::MultipleResultLines { count: lines.len() }),
        }
    }

    /// Parses one line `IOVMM-RESULT {...}` (text before the prefix is ignored).
    pub fn parse_line(line: &str) -> Result<Self, GuestError> {
        let start = line.find(RESULT_PREFIX).ok_or(GuestError::NoResultLine)?;
        let json = line[start + RESULT_PREFIX.len()..].trim_end_matches(['\r', '\n']);
        Ok(GuestResult {
            fields: parse_flat_json(json)?,
        })
    }

    /// All fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// One field.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key)?.as_str()
    }

    /// An integer field that fits in u64; hex strings such as `"0x1f"` are accepted too.
    pub fn u64(&self, key: &str) -> Option<u64> {
        match self.fields.get(key)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => u64::from_str_radix(s.strip_prefix("0x")?, 16).ok(),
            _ => None,
        }
    }

    /// The scenario name (`test`).
    pub fn test(&self) -> Option<&str> {
        self.str("test")
    }

    /// `ok`, `failed`, `error`, `unsupported`, `exception` or `timeout`.
    pub fn status(&self) -> Option<&str> {
        self.str("status")
    }

    /// Whether the status is `ok`.
    pub fn is_ok(&self) -> bool {
        self.status() == Some("ok")
    }

    /// The DMA layer's counters (`net-tx` and `dma-map` results).
    pub fn dma_stats(&self) -> Result<DmaStats, GuestError> {
        DmaStats::from_result(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn le_u64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn guest_elf_is_x86_64_entered_at_2_mib_with_identity_loaded_segments() {
        let bytes = std::fs::read(test_guest_path()).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 62, "EM_X86_64");
        assert_eq!(le_u64(&bytes, 24), 0x20_0000, "entry");
        let phoff = le_u64(&bytes, 32) as usize;
        let phentsize = u16::from_le_bytes([bytes[54], bytes[55]]) as usize;
        let phnum = u16::from_le_bytes([bytes[56], bytes[57]]) as usize;
        let loads: Vec<(u64, u64, u64)> = (0..phnum)
            .map(|i| &bytes[phoff + i * phentsize..])
            .filter(|ph| u32::from_le_bytes(ph[..4].try_into().unwrap()) == 1)
            .map(|ph| (le_u64(ph, 16), le_u64(ph, 24), le_u64(ph, 40)))
            .collect();
        assert!(!loads.is_empty());
        for (vaddr, paddr, memsz) in loads {
            assert_eq!(vaddr, paddr, "vaddr = paddr");
            assert!(
                paddr >= 0x20_0000 && paddr + memsz <= 0x100_0000,
                "segment at {paddr:#x}"
            );
        }
    }

    #[test]
    fn guest_code_has_no_sse_avx_x87_or_emulator_hostile_instructions() {
        let out = std::process::Command::new("objdump")
            .arg("-d")
            .arg(test_guest_path())
            .output()
            .expect("objdump (binutils, see resources/install-deps.sh)");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("<_start>:") || text.contains("<__image_start>:"));
        for bad in [
            "%xmm",
            "%ymm",
            "%zmm",
            "%st",
            "int3",
            "xsave",
            "xrstor",
            "cmpxchg16b",
        ] {
            assert!(!text.contains(bad), "the guest contains {bad}");
        }
    }

    #[test]
    fn cmdline_starts_with_test_and_keeps_parameter_order() {
        let s = Scenario::net_tx(1000, 1500)
            .iommu(IommuMode::Strict)
            .batch(8);
        assert_eq!(
            s.cmdline().unwrap(),
            "iovmm.test=net-tx iovmm.frames=1000 iovmm.size=1500 iovmm.iommu=strict iovmm.batch=8"
        );
        assert_eq!(Scenario::hello().cmdline().unwrap(), "iovmm.test=hello");
    }

    #[test]
    fn viommu_parameters_render_as_the_guest_parses_them() {
        let s = Scenario::dma_map(50, 6000)
            .iommu(IommuMode::Lazy)
            .viommu(ViommuKind::Vtd)
            .ats(AtsMode::Off)
            .lazy_batch(32)
            .lazy_flush(LazyFlush::Pages)
            .inflight(8)
            .bdf(0, 3, 1);
        assert_eq!(
            s.cmdline().unwrap(),
            "iovmm.test=dma-map iovmm.iterations=50 iovmm.size=6000 iovmm.iommu=lazy \
             iovmm.viommu=vtd iovmm.ats=off iovmm.lazy_batch=32 iovmm.lazy_flush=pages \
             iovmm.inflight=8 iovmm.bdf=00:03.1"
        );
        let s = Scenario::net_tx(1, 60)
            .viommu(ViommuKind::Virtio)
            .ats(AtsMode::On);
        assert!(s
            .cmdline()
            .unwrap()
            .ends_with("iovmm.viommu=virtio iovmm.ats=on"));
        assert!(Scenario::hello()
            .viommu(ViommuKind::Auto)
            .ats(AtsMode::Auto)
            .lazy_flush(LazyFlush::Domain)
            .cmdline()
            .unwrap()
            .ends_with("iovmm.viommu=auto iovmm.ats=auto iovmm.lazy_flush=domain"));
    }

    #[test]
    fn withheld_virtio_iommu_features_render_as_hex() {
        let s = Scenario::dma_map(1, 1)
            .viommu_withhold(VIRTIO_IOMMU_F_BYPASS_CONFIG | VIRTIO_IOMMU_F_PROBE);
        assert!(s.cmdline().unwrap().ends_with("iovmm.viommu_withhold=0x50"));
    }

    #[test]
    fn bad_frame_is_a_net_tx_parameter() {
        let s = Scenario::net_tx(10, 60).bad_frame(3);
        assert!(s.cmdline().unwrap().ends_with("iovmm.bad_frame=3"));
    }

    #[test]
    fn blk_stale_runs_in_strict_mode() {
        let line = Scenario::blk_stale(4096).cmdline().unwrap();
        assert_eq!(
            line,
            "iovmm.test=blk-stale iovmm.size=4096 iovmm.iommu=strict"
        );
    }

    #[test]
    fn bdf_masks_device_and_function_bits() {
        let s = Scenario::dma_map(1, 1).bdf(0x12, 0x3f, 9);
        assert!(s.cmdline().unwrap().ends_with("iovmm.bdf=12:1f.1"));
    }

    #[test]
    fn iommu_mode_names_round_trip() {
        for m in IommuMode::ALL {
            assert_eq!(IommuMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(IommuMode::parse("fast"), None);
        assert_eq!(ViommuKind::Vtd.driver_name(), Some("vt-d"));
        assert_eq!(ViommuKind::Virtio.driver_name(), Some("virtio-iommu"));
        assert_eq!(ViommuKind::Auto.driver_name(), None);
    }

    #[test]
    fn setting_a_parameter_twice_keeps_the_last_value() {
        let s = Scenario::net_tx(1, 60).frames(5);
        assert_eq!(
            s.cmdline().unwrap(),
            "iovmm.test=net-tx iovmm.frames=5 iovmm.size=60"
        );
    }

    #[test]
    fn cmdline_rejects_whitespace_and_empty_parts() {
        assert!(matches!(
            Scenario::new("a b").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k", "x y").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k=v", 1).cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k", "").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
    }

    #[test]
    fn cmdline_longer_than_the_guest_buffer_is_rejected() {
        let s = Scenario::hello().param("blob", "x".repeat(MAX_CMDLINE_LEN));
        assert!(matches!(
            s.cmdline(),
            Err(GuestError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn exception_exit_code_adds_the_vector() {
        assert_eq!(exception_exit_code(PAGE_FAULT_VECTOR), 0x4e);
        assert_eq!(exception_exit_code(0), EXIT_EXCEPTION_BASE);
    }

    #[test]
    fn result_line_is_found_among_serial_output() {
        let out = "boot\r\nIOVMM-TEST hello ok\r\nIOVMM-RESULT {\"test\":\"hello\",\"status\":\"ok\",\"ring0_cycles\":1234}\r\n";
        let r = GuestResult::from_output(out).unwrap();
        assert_eq!(r.test(), Some("hello"));
        assert!(r.is_ok());
        assert_eq!(r.u64("ring0_cycles"), Some(1234));
        assert_eq!(r.fields().len(), 3);
    }

    #[test]
    fn missing_or_repeated_result_lines_are_errors() {
        assert_eq!(
            GuestResult::from_output("IOVMM-TEST hello ok\n"),
            Err(GuestError::NoResultLine)
        );
        let twice = "IOVMM-RESULT {}\nIOVMM-RESULT {}\n";
        assert_eq!(
            GuestResult::from_output(twice),
            Err(GuestError::MultipleResultLines { count: 2 })
        );
    }

    #[test]
    fn flat_json_decodes_all_value_kinds() {
        let m = parse_flat_json(r#" { "s" : "a\"b\\c\n\u00e9\ud83d\ude00", "i":-12, "big":18446744073709551615, "f":1.5e3, "t":true, "n":null } "#)
            .unwrap();
        assert_eq!(m["s"], Value::String("a\"b\\c\né😀".to_string()));
        assert_eq!(m["i"].as_i64(), Some(-12));
        assert_eq!(m["big"].as_u64(), Some(u64::MAX));
        assert_eq!(m["f"].as_f64(), Some(1500.0));
        assert_eq!(m["f"].as_u64(), None);
        assert_eq!(m["t"], Value::Bool(true));
        assert_eq!(m["n"], Value::Null);
        assert!(parse_flat_json("{}").unwrap().is_empty());
    }

    #[test]
    fn flat_json_rejects_nesting_duplicates_and_trailing_text() {
        assert!(matches!(
            parse_flat_json(r#"{"a":{"b":1}}"#),
            Err(GuestError::Syntax { .. })
        ));
        assert!(matches!(
            parse_flat_json(r#"{"a":[1]}"#),
            Err(GuestError::Syntax { .. })
        ));
        assert_eq!(
            parse_flat_json(r#"{"a":1,"a":2}"#),
            Err(GuestError::DuplicateKey("a".into()))
        );
        assert!(matches!(
            parse_flat_json(r#"{"a":1} x"#),
            Err(GuestError::Syntax { column: 9, .. })
        ));
    }

    #[test]
    fn flat_json_rejects_malformed_tokens() {
        for bad in [
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":tru}"#,
            r#"{"a":"x}"#,
            r#"{"a":"\q"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":1"#,
            r#"[1]"#,
            "",
        ] {
            assert!(
                matches!(parse_flat_json(bad), Err(GuestError::Syntax { .. })),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn u64_fields_accept_only_unsigned_integers_and_hex_strings() {
        let r = GuestResult::parse_line(
            r#"IOVMM-RESULT {"neg":-1,"f":2.0,"huge":999999999999999999999999999999,"h":"0x1f","s":"12"}"#,
        )
        .unwrap();
        for key in ["neg", "f", "huge", "s", "absent"] {
            assert_eq!(r.u64(key), None, "{key}");
        }
        assert_eq!(r.u64("h"), Some(0x1f));
    }

    #[test]
    fn exception_result_carries_hex_strings() {
        let line = r#"IOVMM-RESULT {"test":"fault","status":"exception","vector":14,"error":6,"rip":"0x2003a1","cr2":"0x8000000000"}"#;
        let r = GuestResult::parse_line(line).unwrap();
        assert_eq!(r.status(), Some("exception"));
        assert!(!r.is_ok());
        assert_eq!(r.u64("vector"), Some(14));
        assert_eq!(r.u64("cr2"), Some(0x80_0000_0000));
        assert_eq!(r.str("vector"), None);
    }
}
