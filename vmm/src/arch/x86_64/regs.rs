//! Initial vCPU state for a 64-bit entry: GDT, identity page tables, segment
//! and control registers, general registers, FPU, MSRs, LAPIC LINT pins and
//! CPUID.
//!
//! The boot vCPU enters the kernel (or test guest) in long mode with the
//! first 4 GiB identity-mapped by 2 MiB pages, `CS = 0x10`, `DS = SS = 0x18`
//! and `RSI` pointing at the zero page, as the Linux x86 64-bit boot protocol
//! requires. Application processors stay in wait-for-SIPI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
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

/// Gives the vCPU KVM's supported CPUID with its APIC id filled in.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, cpus: u8) -> Result<(), RegsError> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((cpus as u32) << 16);
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
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
}
