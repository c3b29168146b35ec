//! What one nested scenario runs inside L1: the vIOMMU, the vhost-user
//! device and its backend, the Linux guest's command line, and what the
//! result must show. [`acceptance`] is the suite CI runs.

use std::fmt::Write as _;

/// The vhost-user backend serving the guest's virtio-net device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// No network device.
    None,
    /// `iovmm-test-backend` (our IOTLB-aware backend); `access_platform`
    /// false makes it withhold VIRTIO_F_ACCESS_PLATFORM.
    Own {
        /// Offer VIRTIO_F_ACCESS_PLATFORM.
        access_platform: bool,
    },
    /// DPDK `dpdk-testpmd` with `net_vhost0,iommu-support=1`, rxonly.
    Testpmd,
    /// No vhost-user backend: L1's kernel vhost-net (`--net tap=..,vhost=on`) with the tap
    /// [`TAP`], whose far end `iovmm-tap-peer` counts and checks the guest's frames and sends
    /// the frames it receives.
    VhostNet,
}

impl Backend {
    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Backend::None => "-",
            Backend::Own { .. } => "own",
            Backend::Testpmd => "testpmd",
            Backend::VhostNet => "vhost-net",
        }
    }
}

/// How the scenario must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest runs its workload and powers off (iovmm exits 0).
    PowerOff,
    /// iovmm refuses the configuration: exit status 1 and this text in its
    /// error line.
    SetupError(&'static str),
}

/// One Linux guest run inside L1.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique name (letters, digits, `-`); also names its files in L1.
    pub name: String,
    /// Guest vCPUs.
    pub cpus: u8,
    /// `--iommu` value, if any.
    pub iommu: Option<&'static str>,
    /// Backend of the one virtio-net device.
    pub backend: Backend,
    /// The device goes behind the vIOMMU (`iommu=on`).
    pub device_iommu: bool,
    /// The device exposes ATS (`ats=on`).
    pub ats: bool,
    /// Extra guest kernel arguments (IOMMU mode, qdisc).
    pub guest_args: &'static str,
    /// Frames of the workload (0: no workload): UDP frames the guest sends,
    /// or with `rx` generated frames our backend sends into the guest.
    pub frames: u32,
    /// The workload is receive (`iovmm.bench=net-rx`, our backend's
    /// generator) instead of transmit.
    pub rx: bool,
    /// The device is a vhost-user-blk disk on our backend (`--blk`), and
    /// the workload writes `frames` 64 KiB blocks, syncs, drops the page
    /// cache and reads them back (`iovmm.bench=blk`).
    pub blk: bool,
    /// The guest's default qdisc for the workload. With `pfifo_fast` a full
    /// queue pushes back on the sender, so every frame must arrive; with
    /// `fq_codel` the guest's AQM may drop frames that queue too long, and
    /// every missing frame must then be one the qdisc counted as dropped.
    pub qdisc: &'static str,
    /// How it ends.
    pub outcome: Outcome,
    /// Lines (substrings) the guest or iovmm must print.
    pub expect_lines: &'static [&'static str],
    /// The device must have served IOTLB misses.
    pub expect_misses: bool,
    /// Unmaps must have arrived as device-TLB invalidations.
    pub expect_devtlb: bool,
    /// The backend asks read-write for write-only RX buffers (DPDK does):
    /// iovmm must refuse the miss, report the fault, and nothing arrives.
    pub expect_rw_refusal: bool,
    /// The guest waits for the ACPI power button (`iovmm.poweroff=button`) and L1 shuts the VM
    /// down through the control API (`PUT vm.shutdown` with curl): iovmm must end through the
    /// guest's own S5 power-off, not a forced stop.
    pub api_shutdown: bool,
    /// Boot the fast test guest (`tests/guest`, `$IOVMM_TEST_GUEST` in L1) with this command
    /// line instead of Linux; it reports through its `IOVMM-RESULT` line and the exit port.
    pub test_guest: Option<String>,
    /// Queue pairs of the net device (`queues=N`) and of our backend (`--queues N`).
    pub queues: u16,
}

/// The tap of the vhost-net scenarios in L1 (created before, deleted after each).
pub const TAP: &str = "iovmmtap0";

/// Guest RAM of every scenario.
pub const GUEST_MEMORY: &str = "512M";
/// Frame size of the guest's UDP workload (bytes on the wire).
pub const FRAME_SIZE: u32 = 256;
/// What the guest's init prints once it read the power button's KEY_POWER.
pub const POWER_BUTTON_LINE: &str = "iovmm-init: power button pressed";
/// What the guest's init prints once it waits for the power button (L1 presses it then).
pub const POWER_BUTTON_WAIT_LINE: &str = "iovmm-init: waiting for the power button";
/// How long L1's shutdown request lets the guest take to power off, in milliseconds.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 30_000;

/// The Linux guest's base command line (the workload and IOMMU mode are added).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 rdinit=/init quiet";

impl Scenario {
    fn base(name: &str) -> Self {
        Scenario {
            name: name.to_string(),
            cpus: 1,
            iommu: None,
            backend: Backend::None,
            device_iommu: false,
            ats: false,
            guest_args: "",
            frames: 0,
            rx: false,
            blk: false,
            qdisc: "pfifo_fast",
            outcome: Outcome::PowerOff,
            expect_lines: &[],
            expect_misses: false,
            expect_devtlb: false,
            expect_rw_refusal: false,
            api_shutdown: false,
            test_guest: None,
            queues: 1,
        }
    }

    /// A plain 1-vCPU boot to init and power-off, no devices.
    pub fn boot(name: &str) -> Self {
        Scenario {
            expect_lines: &["cpus online: 0 "],
            ..Self::base(name)
        }
    }

    /// Boot, then wait for the power button: L1 presses it through the control API.
    pub fn api_shutdown(name: &str, iommu: Option<&'static str>, guest_args: &'static str) -> Self {
        Scenario {
            iommu,
            guest_args,
            api_shutdown: true,
            expect_lines: &[POWER_BUTTON_LINE],
            ..Self::base(name)
        }
    }

    fn net(
        name: &'static str,
        iommu: Option<&'static str>,
        backend: Backend,
        guest_args: &'static str,
    ) -> Self {
        Scenario {
            iommu,
            backend,
            device_iommu: iommu.is_some(),
            guest_args,
            frames: 1000,
            expect_misses: iommu.is_some(),
            ..Self::base(name)
        }
    }

    /// The guest kernel command line.
    pub fn cmdline(&self) -> String {
        if let Some(t) = &self.test_guest {
            return t.clone();
        }
        let mut c = String::from(BASE_CMDLINE);
        if !self.guest_args.is_empty() {
            let _ = write!(c, " {}", self.guest_args);
        }
        if self.api_shutdown {
            c.push_str(" iovmm.poweroff=button");
        }
        if self.frames > 0 && self.blk {
            let _ = write!(c, " iovmm.bench=blk iovmm.frames={}", self.frames);
        } else if self.frames > 0 && self.rx {
            let _ = write!(
                c,
                " iovmm.bench=net-rx iovmm.frames={} iovmm.size={FRAME_SIZE}",
                self.frames
            );
        } else if self.frames > 0 {
            let _ = write!(
                c,
                " iovmm.bench=net-tx iovmm.frames={} iovmm.size={FRAME_SIZE} iovmm.qdisc={}",
                self.frames, self.qdisc
            );
        }
        c
    }

    /// Whether this is a use-after-unmap run of the fast test guest.
    pub fn is_stale(&self) -> bool {
        self.test_guest
            .as_deref()
            .is_some_and(|c| c.starts_with("iovmm.test=net-stale"))
    }

    /// The `--net` value of a vhost-net scenario on tap `tap`.
    pub fn net_arg(&self, tap: &str) -> Option<String> {
        if self.backend != Backend::VhostNet {
            return None;
        }
        let iommu = if self.device_iommu { ",iommu=on" } else { "" };
        Some(format!("tap={tap},vhost=on{iommu}"))
    }

    /// With `queues` > 1 and our backend: every pair carried frames and the pairs add up to
    /// the backend's total (its `TxPerPair { tx_pair0: N, ... }` line after the counters);
    /// `None` when that holds or does not apply, else what is wrong.
    pub fn queue_pairs_problem(&self, backend_log: &str) -> Option<String> {
        if self.queues < 2 || !matches!(self.backend, Backend::Own { .. }) {
            return None;
        }
        let count = |key: &str| -> Option<u64> {
            let i = backend_log.rfind(key)? + key.len();
            let digits: String = backend_log[i..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        let per: Vec<Option<u64>> = (0..self.queues)
            .map(|k| count(&format!("tx_pair{k}: ")))
            .collect();
        let total = count("tx_frames: ");
        let sum = per.iter().try_fold(0u64, |s, n| n.map(|n| s + n));
        if per.iter().any(|n| n.is_none_or(|n| n == 0)) || sum != total {
            return Some(format!(
                "frames per queue pair at the backend {per:?} (total {total:?}): every pair must carry frames"
            ));
        }
        None
    }

    /// The `--vhost-user` value for the device on `socket`, if it has one.
    pub fn vhost_user_arg(&self, socket: &str) -> Option<String> {
        if matches!(self.backend, Backend::None | Backend::VhostNet) {
            return None;
        }
        let kind = if self.blk { "blk" } else { "net" };
        let mut a = format!("{kind},socket={socket}");
        if self.device_iommu {
            a.push_str(",iommu=on");
        }
        if self.ats {
            a.push_str(",ats=on");
        }
        if self.queues > 1 {
            let _ = write!(a, ",queues={}", self.queues);
        }
        Some(a)
    }
}

const VIRTIO_IOMMU_LINES: &[&str] = &[
    "virtio_iommu virtio0: input address",
    "Adding to iommu group",
];
const VTD_LINES: &[&str] = &[
    "DMAR: IOMMU enabled",
    "Using Queued invalidation",
    "Adding to iommu group",
];
const VTD_QI_IR_LINES: &[&str] = &[
    "DMAR: IOMMU enabled",
    "Using Queued invalidation",
    "DMAR-IR: Enabled IRQ remapping",
    "Adding to iommu group",
];
const SMP_MQ_LINES: &[&str] = &[
    "cpus online: 0-1 processors: 2",
    "virtio_iommu virtio0: input address",
    "Adding to iommu group",
];
const SMP_MQ_VTD_LINES: &[&str] = &[
    "cpus online: 0-1 processors: 2",
    "DMAR: IOMMU enabled",
    "Adding to iommu group",
];
const VTD_FULL: &str = "vtd,caching_mode=on,device_iotlb=on,intremap=on";
const OWN: Backend = Backend::Own {
    access_platform: true,
};

fn with_lines(mut s: Scenario, lines: &'static [&'static str]) -> Scenario {
    s.expect_lines = lines;
    s
}

fn boots() -> Vec<Scenario> {
    vec![
        Scenario::boot("boot-1cpu"),
        Scenario {
            cpus: 2,
            expect_lines: &["cpus online: 0-1 processors: 2"],
            ..Scenario::base("boot-2cpu")
        },
        Scenario::net("net-plain-own", None, OWN, ""),
        // The ACPI power button: GED interrupt on IOAPIC pin 9, Notify on PNP0C0C, KEY_POWER,
        // the guest's S5; with VT-d interrupt remapping the pin's IOAPIC entry is remappable.
        Scenario::api_shutdown("acpi-shutdown", None, ""),
        Scenario {
            expect_lines: &["DMAR-IR: Enabled IRQ remapping", POWER_BUTTON_LINE],
            ..Scenario::api_shutdown("acpi-shutdown-vtd-ir", Some(VTD_FULL), "intel_iommu=on")
        },
    ]
}

fn virtio_iommu() -> Vec<Scenario> {
    let v = Some("virtio");
    vec![
        with_lines(
            Scenario::net("viommu-strict-own", v, OWN, "iommu.strict=1"),
            VIRTIO_IOMMU_LINES,
        ),
        with_lines(
            Scenario::net("viommu-lazy-own", v, OWN, "iommu.strict=0"),
            VIRTIO_IOMMU_LINES,
        ),
        // Linux's default qdisc: frames may be dropped by the guest's AQM, never by the device.
        Scenario {
            qdisc: "fq_codel",
            ..Scenario::net("viommu-strict-own-fqcodel", v, OWN, "iommu.strict=1")
        },
        with_lines(
            Scenario::net("viommu-pt-own", v, OWN, "iommu.passthrough=1"),
            VIRTIO_IOMMU_LINES,
        ),
        // Two vCPUs and two queue pairs: Linux's virtio-net sends VQ_PAIRS_SET on the control
        // queue (served by iovmm through the vIOMMU); the guest sends half the frames from
        // each CPU (iovmm.tx_cpus=2), i.e. on each TX queue, and the backend counts per pair.
        Scenario {
            cpus: 2,
            queues: 2,
            expect_lines: SMP_MQ_LINES,
            ..Scenario::net(
                "smp-mq-viommu-strict-own",
                v,
                OWN,
                "iommu.strict=1 iovmm.tx_cpus=2",
            )
        },
        with_lines(
            Scenario::net("viommu-strict-dpdk", v, Backend::Testpmd, "iommu.strict=1"),
            VIRTIO_IOMMU_LINES,
        ),
        with_lines(
            Scenario::net("viommu-lazy-dpdk", v, Backend::Testpmd, "iommu.strict=0"),
            VIRTIO_IOMMU_LINES,
        ),
    ]
}

fn vtd() -> Vec<Scenario> {
    let v = Some("vtd");
    let full = Some(VTD_FULL);
    let strict = "intel_iommu=on iommu.strict=1";
    let ats = |mut s: Scenario| {
        s.ats = true;
        s.expect_devtlb = true;
        s.expect_lines = VTD_QI_IR_LINES;
        s
    };
    vec![
        with_lines(Scenario::net("vtd-strict-own", v, OWN, strict), VTD_LINES),
        with_lines(
            Scenario::net("vtd-pt-own", v, OWN, "intel_iommu=on iommu=pt"),
            VTD_LINES,
        ),
        with_lines(
            Scenario::net("vtd-strict-dpdk", v, Backend::Testpmd, strict),
            VTD_LINES,
        ),
        // Two vCPUs and two queue pairs behind VT-d: both CPUs map and unmap through the one
        // queued-invalidation interface while each sends on its own TX queue.
        Scenario {
            cpus: 2,
            queues: 2,
            expect_lines: SMP_MQ_VTD_LINES,
            ..Scenario::net(
                "smp-mq-vtd-strict-own",
                v,
                OWN,
                "intel_iommu=on iommu.strict=1 iovmm.tx_cpus=2",
            )
        },
        ats(Scenario::net("vtd-ats-strict-own", full, OWN, strict)),
        ats(Scenario::net(
            "vtd-ats-strict-dpdk",
            full,
            Backend::Testpmd,
            strict,
        )),
    ]
}

/// Our backend writes into the guest: Linux's virtio-net RX buffers are
/// mapped device-writable (DMA_FROM_DEVICE).
fn receive() -> Vec<Scenario> {
    let rx = |mut s: Scenario| {
        s.rx = true;
        s
    };
    vec![
        rx(Scenario::net("rx-plain-own", None, OWN, "")),
        rx(Scenario::net("rx-plain-dpdk", None, Backend::Testpmd, "")),
        // DPDK 22.11 translates RX buffers for read-write access
        // (fill_vec_buf_split(.., VHOST_ACCESS_RW)); Linux maps them
        // DMA_FROM_DEVICE, write-only. iovmm refuses the wider miss.
        Scenario {
            rx: true,
            expect_misses: false,
            expect_rw_refusal: true,
            ..Scenario::net(
                "rx-viommu-strict-dpdk",
                Some("virtio"),
                Backend::Testpmd,
                "iommu.strict=1",
            )
        },
        rx(with_lines(
            Scenario::net(
                "rx-viommu-strict-own",
                Some("virtio"),
                OWN,
                "iommu.strict=1",
            ),
            VIRTIO_IOMMU_LINES,
        )),
        rx(with_lines(
            Scenario::net(
                "rx-vtd-strict-own",
                Some("vtd"),
                OWN,
                "intel_iommu=on iommu.strict=1",
            ),
            VTD_LINES,
        )),
    ]
}

/// virtio-blk from Linux: our backend reads and writes guest memory.
fn block() -> Vec<Scenario> {
    let blk = |name, iommu, args, lines| Scenario {
        blk: true,
        frames: 64,
        expect_lines: lines,
        ..Scenario::net(name, iommu, OWN, args)
    };
    vec![
        blk("blk-plain-own", None, "", &[]),
        blk(
            "blk-viommu-strict-own",
            Some("virtio"),
            "iommu.strict=1",
            VIRTIO_IOMMU_LINES,
        ),
        blk(
            "blk-vtd-strict-own",
            Some("vtd"),
            "intel_iommu=on iommu.strict=1",
            VTD_LINES,
        ),
    ]
}

fn bad_input() -> Vec<Scenario> {
    vec![
        // Linux leaves the DMAR off without intel_iommu=on: translation stays
        // disabled and DMA addresses are guest-physical.
        Scenario {
            expect_misses: true,
            ..Scenario::net("vtd-guest-off-own", Some("vtd"), OWN, "")
        },
        Scenario {
            frames: 0,
            outcome: Outcome::SetupError("VIRTIO_F_ACCESS_PLATFORM"),
            expect_misses: false,
            ..Scenario::net(
                "viommu-backend-no-iotlb",
                Some("virtio"),
                Backend::Own {
                    access_platform: false,
                },
                "",
            )
        },
    ]
}

/// The kernel's vhost-net in L1, with its device IOTLB behind each vIOMMU: L2's virtio-net
/// sends UDP frames through vhost-net into the tap (counted and checked by the tap's peer)
/// and receives the peer's sequence frames (every byte checked by the guest).
fn vhost_net() -> Vec<Scenario> {
    const VN: Backend = Backend::VhostNet;
    let rx = |mut s: Scenario| {
        s.rx = true;
        s
    };
    let strict_vtd = "intel_iommu=on iommu.strict=1";
    vec![
        Scenario::net("vhost-net-plain", None, VN, ""),
        rx(Scenario::net("vhost-net-rx-plain", None, VN, "")),
        with_lines(
            Scenario::net(
                "vhost-net-viommu-strict",
                Some("virtio"),
                VN,
                "iommu.strict=1",
            ),
            VIRTIO_IOMMU_LINES,
        ),
        rx(with_lines(
            Scenario::net(
                "vhost-net-rx-viommu-strict",
                Some("virtio"),
                VN,
                "iommu.strict=1",
            ),
            VIRTIO_IOMMU_LINES,
        )),
        with_lines(
            Scenario::net(
                "vhost-net-viommu-lazy",
                Some("virtio"),
                VN,
                "iommu.strict=0",
            ),
            VIRTIO_IOMMU_LINES,
        ),
        with_lines(
            Scenario::net("vhost-net-vtd-strict", Some("vtd"), VN, strict_vtd),
            VTD_LINES,
        ),
        rx(with_lines(
            Scenario::net("vhost-net-rx-vtd-strict", Some("vtd"), VN, strict_vtd),
            VTD_LINES,
        )),
        stale("vhost-net-stale-viommu", "virtio"),
        stale("vhost-net-stale-vtd", "vtd"),
        test_guest_rx("vhost-net-testguest-rx-vtd", "vtd"),
    ]
}

/// The fast test guest receives the peer's 1000 frames behind the vIOMMU (strict), checks every
/// byte, then resets the device: vhost-net's stop path (rings without backend, GET_VRING_BASE)
/// under the vCPU's seccomp filter, which Linux's power-off does not take.
fn test_guest_rx(name: &str, iommu: &'static str) -> Scenario {
    let frames = 1000;
    let guest = crate::guest::Scenario::net_rx(frames, u64::from(FRAME_SIZE))
        .iommu(crate::guest::IommuMode::Strict)
        .cmdline()
        .unwrap_or_default();
    Scenario {
        iommu: Some(iommu),
        backend: Backend::VhostNet,
        device_iommu: true,
        test_guest: Some(guest),
        rx: true,
        frames: 1000,
        expect_misses: true,
        ..Scenario::base(name)
    }
}

/// Size of the fast test guest's frames in the use-after-unmap scenarios.
pub const STALE_SIZE: u64 = 200;

/// Use after unmap through the kernel's IOTLB: the fast test guest (on nested KVM) sends
/// frame 0 from IOVA b, strictly unmaps b (its INVALIDATE is written to the vhost fd before the
/// unmap completes), then posts a TX descriptor at b carrying a marker. The kernel misses on b,
/// iovmm refuses the miss and reports the fault; the kernel keeps the queue stopped (a MISS has
/// no answer but an UPDATE), so the marker never reaches the tap.
fn stale(name: &str, iommu: &'static str) -> Scenario {
    let guest = crate::guest::Scenario::net_stale(STALE_SIZE, 4)
        .expect_stall(2000)
        .cmdline()
        .unwrap_or_default();
    Scenario {
        iommu: Some(iommu),
        backend: Backend::VhostNet,
        device_iommu: true,
        test_guest: Some(guest),
        ..Scenario::base(name)
    }
}

/// The nested acceptance suite, in the order it runs.
pub fn acceptance() -> Vec<Scenario> {
    let mut all = boots();
    all.extend(virtio_iommu());
    all.extend(vtd());
    all.extend(receive());
    all.extend(block());
    all.extend(vhost_net());
    all.extend(bad_input());
    all
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queue_pairs_must_all_carry_frames() {
        let sc = acceptance().into_iter().find(|s| s.queues == 2).unwrap();
        assert!(sc.vhost_user_arg("/s").unwrap().ends_with(",queues=2"));
        let log = |a, b| {
            format!("CountersSnapshot {{ tx_frames: {} }}\nTxPerPair {{ tx_pair0: {a}, tx_pair1: {b} }}", a + b)
        };
        assert_eq!(sc.queue_pairs_problem(&log(500, 500)), None);
        assert!(sc.queue_pairs_problem(&log(1000, 0)).is_some());
        assert!(sc
            .queue_pairs_problem("CountersSnapshot { tx_frames: 9 }")
            .is_some());
        assert_eq!(Scenario::boot("b").queue_pairs_problem(""), None);
    }

    #[test]
    fn names_are_unique_and_shell_safe() {
        let all = acceptance();
        let mut names: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for n in names {
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{n}"
            );
        }
    }

    #[test]
    fn command_lines_carry_mode_and_workload() {
        let s = acceptance()
            .into_iter()
            .find(|s| s.name == "vtd-ats-strict-dpdk")
            .unwrap();
        let c = s.cmdline();
        assert!(c.contains("intel_iommu=on iommu.strict=1 iovmm.bench=net-tx"));
        assert_eq!(
            s.vhost_user_arg("/tmp/x.sock").unwrap(),
            "net,socket=/tmp/x.sock,iommu=on,ats=on"
        );
        assert_eq!(s.iommu, Some(VTD_FULL));
    }
}
