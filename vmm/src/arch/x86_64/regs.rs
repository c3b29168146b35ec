//! Initial vCPU state for a 64-bit entry: GDT, identity page tables, segment
//! and control registers, general registers, FPU, MSRs, LAPIC LINT pins and
//! CPUID.
//!
//! The boot vCPU enters the kernel (or test guest) in long mode with the
//! first 4 GiB identity-mapped by 2 MiB pages, `CS = 0x10`, `DS = SS = 0x18`
//! and `RSI` pointing at the zero page, as the Linux x86 64-bit boot protocol
//! requires. Application processors stay in wait-for-SIPI.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Number of 1 GiB slots (each with a page directory) identity-mapped at boot.
const IDENTITY_GIBS: u64 = 4;

/// Boot GDT, indexed by selector / 8: null, null, code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Boot code selector.
pub const BOOT_CS: u16 = 0x10;
/// Boot data selector.
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Register setup errors.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the boot {0} into guest memory")]
    GuestMemory(&'static str),
    /// A vCPU ioctl failed.
    #[error("KVM {op} failed on a vCPU")]
    Kvm {
        /// Which ioctl.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID entry list has no room for a leaf we must add.
    #[error("cannot add CPUID leaf {0:#x}: the entry list is full")]
    CpuidFull(u32),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

/// Encodes a GDT descriptor from access/flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// Decodes a GDT descriptor into the KVM segment register form.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and the 4 GiB identity map into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::GuestMemory("GDT"))?;
    }
    let pt = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| RegsError::GuestMemory("page tables"))
    };
    pt(PDPTE_START | 0x3, PML4_START)?;
    for g in 0..IDENTITY_GIBS {
        let pd = PDE_START + g * 0x1000;
        pt(pd | 0x3, PDPTE_START + g * 8)?;
        for i in 0..512u64 {
            pt(((g * 512 + i) << 21) | 0x83, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Special registers for the 64-bit entry, starting from the vCPU's current ones.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[2], BOOT_CS / 8);
    let data = segment_from_gdt(BOOT_GDT[3], BOOT_DS / 8);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[4], BOOT_TSS / 8);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Puts the boot vCPU into 64-bit mode at `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm_err("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    setup_msrs(vcpu)
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const FAST_STRING: u64 = 1;
    let entries = [
        (0x174, 0),       // SYSENTER_CS
        (0x175, 0),       // SYSENTER_ESP
        (0x176, 0),       // SYSENTER_EIP
        (0xc000_0081, 0), // STAR
        (0xc000_0082, 0), // LSTAR
        (0xc000_0084, 0), // SYSCALL_MASK
        (0xc000_0102, 0), // KERNEL_GS_BASE
        (MSR_IA32_MISC_ENABLE, FAST_STRING),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::GuestMemory("MSR list"))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::debug!("vcpu: KVM accepted {set} of {} boot MSRs", entries.len());
    }
    Ok(())
}

/// Programs LINT0 as ExtINT and LINT1 as NMI, as firmware would.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 0x4;
    const MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// CPUID.1:ECX bit 24: TSC-deadline mode of the local APIC timer.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM paravirt signature leaf: EAX = highest KVM leaf, EBX:ECX:EDX = "KVMKVMKVM\0\0\0".
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirt feature leaf: EAX = `KVM_FEATURE_*` bits.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// `KVM_FEATURE_CLOCKSOURCE` (MSR 0x11/0x12) and `KVM_FEATURE_CLOCKSOURCE2` (MSR 0x4b564d00/01).
const KVM_FEATURE_KVMCLOCK: u32 = (1 << 0) | (1 << 3);

/// What the host KVM offers beyond KVM_GET_SUPPORTED_CPUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidHost {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC emulates TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// Turns KVM's supported CPUID into the guest's CPUID for vCPU `id` of `cpus`.
///
/// Linux on KVM needs (Firecracker and Cloud Hypervisor make the same
/// adjustments):
/// - the hypervisor bit, without which it never looks at the KVM leaves, so
///   no kvm-clock: the TSC is then calibrated against the PIT, which a
///   hardware-reduced machine lacks ("tsc: Unable to calibrate against PIT");
/// - the KVM signature and feature leaves (KVM_GET_SUPPORTED_CPUID reports
///   both; should they be missing we add the kvm-clock MSRs, which every KVM
///   with a split irqchip implements, and nothing else);
/// - TSC-deadline, which KVM reports only through KVM_CAP_TSC_DEADLINE_TIMER
///   because it depends on the in-kernel LAPIC (which we always use); without
///   it Linux spends ~100 ms calibrating the LAPIC timer;
/// - the initial APIC id (leaf 1 EBX, leaves 0xB / 0x1F EDX) and the logical
///   processor count.
///
/// Leaf 0x4000_0010 (TSC frequency) is not added: KVM does not report it and
/// Linux takes the TSC frequency from kvm-clock.
pub fn normalize_cpuid(
    cpuid: &mut CpuId,
    id: u8,
    cpus: u8,
    host: CpuidHost,
) -> Result<(), RegsError> {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((cpus as u32) << 16);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                if host.tsc_deadline {
                    e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                }
            }
            0xb | 0x1f => e.edx = id as u32,
            KVM_CPUID_SIGNATURE => e.eax = e.eax.max(KVM_CPUID_FEATURES),
            _ => {}
        }
    }
    ensure_kvm_leaves(cpuid)
}

fn has_leaf(cpuid: &CpuId, function: u32) -> bool {
    cpuid.as_slice().iter().any(|e| e.function == function)
}

fn push_leaf(cpuid: &mut CpuId, function: u32, regs: [u32; 4]) -> Result<(), RegsError> {
    let [eax, ebx, ecx, edx] = regs;
    let entry = kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    };
    cpuid
        .push(entry)
        .map_err(|_| RegsError::CpuidFull(function))
}

fn ensure_kvm_leaves(cpuid: &mut CpuId) -> Result<(), RegsError> {
    if !has_leaf(cpuid, KVM_CPUID_SIGNATURE) {
        log::warn!("cpuid: KVM reports no paravirt signature leaf; adding it with kvm-clock only");
        let [b, c, d] = KVM_SIGNATURE;
        push_leaf(cpuid, KVM_CPUID_SIGNATURE, [KVM_CPUID_FEATURES, b, c, d])?;
    }
    if !has_leaf(cpuid, KVM_CPUID_FEATURES) {
        push_leaf(cpuid, KVM_CPUID_FEATURES, [KVM_FEATURE_KVMCLOCK, 0, 0, 0])?;
    }
    Ok(())
}

/// Gives the vCPU KVM's supported CPUID, normalized by [`normalize_cpuid`].
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, cpus: u8) -> Result<(), RegsError> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let host = CpuidHost {
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    normalize_cpuid(&mut cpuid, id, cpus, host)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_match_known_encodings() {
        // Golden values of the classic flat 64-bit code / data / TSS descriptors.
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[4], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let cs = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s),
            (0x10, 0xb, 1, 0, 1, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x18, 0x3, 0, 1));
        let tss = segment_from_gdt(BOOT_GDT[4], 4);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x20, 0xb, 0));
        let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 1);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn identity_map_covers_four_gib_with_2m_pages() {
        let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_START), PDPTE_START | 3);
        assert_eq!(r(PDPTE_START + 3 * 8), (PDE_START + 0x3000) | 3);
        assert_eq!(r(PDE_START), 0x83);
        assert_eq!(r(PDE_START + 8), 0x20_0083);
        // Last 2 MiB page below 4 GiB (covers the LAPIC / IOAPIC).
        assert_eq!(r(PDE_START + 0x3000 + 511 * 8), 0xffe0_0083);
        assert_eq!(r(GDT_START + 16), BOOT_GDT[2]);
    }

    #[test]
    fn long_mode_registers() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(
            (s.cs.selector, s.ss.selector, s.cr3),
            (BOOT_CS, BOOT_DS, PML4_START)
        );
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    /// Leaves as an upstream KVM_GET_SUPPORTED_CPUID returns them (no hypervisor or
    /// TSC-deadline bit in leaf 1).
    fn supported() -> CpuId {
        let [b, c, d] = KVM_SIGNATURE;
        let mut cpuid = CpuId::new(0).unwrap();
        for e in [
            leaf(0, 0, [0x24, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(1, 0, [0xa0671, 0x0102_0800, 0x0020_2000, 0x0f8b_fbff]),
            leaf(0xb, 0, [0, 0, 0, 7]),
            leaf(0xb, 1, [0, 0, 0, 7]),
            leaf(0x1f, 0, [0, 0, 0, 7]),
            leaf(KVM_CPUID_SIGNATURE, 0, [KVM_CPUID_FEATURES, b, c, d]),
            leaf(KVM_CPUID_FEATURES, 0, [0x0100_7efb, 0, 0, 0]),
        ] {
            cpuid.push(e).unwrap();
        }
        cpuid
    }

    #[test]
    fn cpuid_sets_hypervisor_bit_apic_id_and_keeps_kvm_leaves() {
        let mut c = supported();
        let before = c.as_slice().len();
        normalize_cpuid(&mut c, 2, 4, CpuidHost::default()).unwrap();
        assert_eq!(c.as_slice().len(), before, "no leaf added");
        let l1 = find(&c, 1, 0);
        assert_ne!(l1.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & CPUID_1_ECX_TSC_DEADLINE, 0, "not offered by KVM");
        // Other ECX bits kept; EBX: APIC id 2, 4 logical CPUs, low half kept.
        assert_eq!(l1.ecx & !CPUID_1_ECX_HYPERVISOR, 0x0020_2000);
        assert_eq!(l1.ebx, 0x0204_0800);
        for (f, i) in [(0xb, 0), (0xb, 1), (0x1f, 0)] {
            assert_eq!(find(&c, f, i).edx, 2);
        }
        let sig = find(&c, KVM_CPUID_SIGNATURE, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        assert_eq!(
            find(&c, KVM_CPUID_FEATURES, 0).eax,
            0x0100_7efb,
            "features untouched"
        );
        assert_eq!(find(&c, 0, 0).ebx, 0x756e_6547);
    }

    #[test]
    fn cpuid_advertises_tsc_deadline_only_when_kvm_emulates_it() {
        let mut c = supported();
        normalize_cpuid(&mut c, 0, 1, CpuidHost { tsc_deadline: true }).unwrap();
        assert_ne!(find(&c, 1, 0).ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn cpuid_adds_missing_kvm_leaves_with_kvmclock_only() {
        let mut c = CpuId::new(0).unwrap();
        c.push(leaf(1, 0, [0, 0, 0, 0])).unwrap();
        normalize_cpuid(&mut c, 0, 1, CpuidHost::default()).unwrap();
        let sig = find(&c, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(
            [sig.eax, sig.ebx, sig.ecx, sig.edx],
            [KVM_CPUID_FEATURES, 0x4b4d_564b, 0x564b_4d56, 0x4d]
        );
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, 0b1001);
        // A signature leaf that undersells its max leaf is raised to cover the features.
        let mut c = supported();
        for e in c.as_mut_slice() {
            if e.function == KVM_CPUID_SIGNATURE {
                e.eax = 0;
            }
        }
        normalize_cpuid(&mut c, 0, 1, CpuidHost::default()).unwrap();
        assert_eq!(find(&c, KVM_CPUID_SIGNATURE, 0).eax, KVM_CPUID_FEATURES);
    }

    #[test]
    fn cpuid_full_entry_list_is_an_error_not_a_panic() {
        let mut c = CpuId::new(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        c.as_mut_slice()[0] = leaf(1, 0, [0, 0, 0, 0]);
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 1, CpuidHost::default()),
            Err(RegsError::CpuidFull(KVM_CPUID_SIGNATURE))
        ));
    }
}
