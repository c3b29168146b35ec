//! Loading the kernel, initramfs and command line, and filling the Linux
//! zero page (`boot_params`) with the e820 map.
//!
//! Two kernel formats are accepted: ELF (a Linux `vmlinux` or the project's
//! test guest, both entered at `e_entry` in 64-bit mode) and bzImage (entered
//! at its 64-bit entry, load address + 0x200).

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{Error as LoaderError, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_SIZE, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START,
    MMIO_HOLE_START, PCI_ECAM_SIZE, PCI_ECAM_START, RAM_64BIT_START, ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest address (exclusive) an initramfs may end at when the kernel sets
/// no lower `initrd_addr_max`.
const INITRD_ADDR_MAX: u64 = 0x8000_0000;

/// Boot loading errors.
#[derive(Debug, Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path:?}")]
    Io {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a usable ELF nor a bzImage.
    #[error("kernel image is not a loadable 64-bit ELF or bzImage (pass a vmlinux, a bzImage or the test guest ELF)")]
    Kernel(#[source] LoaderError),
    /// The initramfs does not fit below the kernel's limit.
    #[error("initramfs of {size} bytes does not fit in guest RAM below {limit:#x}; give the guest more memory")]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// The highest allowed end.
        limit: u64,
    },
    /// The command line does not fit.
    #[error("kernel command line of {0} bytes is too long (max {CMDLINE_MAX_SIZE})")]
    Cmdline(usize),
    /// Writing into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestMemory(&'static str),
}

/// What was loaded and where to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads an ELF or bzImage kernel into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut f = open("kernel", path)?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
        }),
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(BootError::Kernel)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Err(e) => Err(BootError::Kernel(e)),
    }
}

/// Loads the initramfs page-aligned at the top of low RAM, below the kernel's
/// `initrd_addr_max`. Returns `(address, size)`.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = open("initramfs", path)?;
    let size = f
        .metadata()
        .map_err(|source| BootError::Io {
            what: "initramfs",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let limit = mem_size.min(MMIO_HOLE_START).min(addr_max);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitramfsTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| BootError::GuestMemory("initramfs"))?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE || cmdline.contains('\0') {
        return Err(BootError::Cmdline(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::GuestMemory("command line"))
}

/// The e820 map for a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let e = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        e(0, EBDA_START, E820_RAM),
        e(ACPI_START, ACPI_SIZE, E820_RESERVED),
        e(HIMEM_START, low_end - HIMEM_START, E820_RAM),
        e(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
    ];
    if mem_size > low_end {
        map.push(e(RAM_64BIT_START, mem_size - low_end, E820_RAM));
    }
    map
}

/// Everything the zero page needs to know.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootParamsInput {
    /// bzImage setup header to start from, if any.
    pub setup_header: Option<setup_header>,
    /// Length of the command line without the NUL.
    pub cmdline_len: usize,
    /// Initramfs `(address, size)`.
    pub initramfs: Option<(u64, u64)>,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Builds the zero page.
pub fn build_boot_params(input: &BootParamsInput) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = input.setup_header {
        p.hdr = h;
    }
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = input.cmdline_len as u32;
    if let Some((addr, size)) = input.initramfs {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = input.rsdp;
    let map = e820_map(input.mem_size);
    for (slot, entry) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    p.e820_entries = map.len() as u8;
    p
}

/// Highest end address the kernel accepts for an initramfs.
pub fn initrd_addr_max(setup_header: Option<&setup_header>) -> u64 {
    match setup_header.map(|h| h.initrd_addr_max) {
        Some(m) if m != 0 => (m as u64 + 1).min(INITRD_ADDR_MAX),
        _ => INITRD_ADDR_MAX,
    }
}

/// Writes the zero page into guest memory.
pub fn write_boot_params(mem: &GuestMemoryMmap, p: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*p, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory("zero page"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn e820_map_for_small_and_large_guests() {
        let m = e820_map(256 << 20);
        let t: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            t,
            vec![
                (0, 0x9fc00, 1),
                (0xe0000, 0x20000, 2),
                (0x100000, (256 << 20) - 0x100000, 1),
                (0xe000_0000, 0x10_0000, 2),
            ]
        );
        let big = e820_map(4 << 30);
        assert_eq!(big.len(), 5);
        assert_eq!((big[2].addr + big[2].size), 0xc000_0000);
        assert_eq!((big[4].addr, big[4].size), (1 << 32, 1 << 30));
    }

    #[test]
    fn zero_page_golden_fields() {
        let p = build_boot_params(&BootParamsInput {
            cmdline_len: 12,
            initramfs: Some((0x0f00_0000, 0x1234)),
            mem_size: 256 << 20,
            rsdp: ACPI_START,
            ..Default::default()
        });
        let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let rd32 = |off: u64| {
            mem.read_obj::<u32>(GuestAddress(ZERO_PAGE_START + off))
                .unwrap()
        };
        let rd8 = |off: u64| {
            mem.read_obj::<u8>(GuestAddress(ZERO_PAGE_START + off))
                .unwrap()
        };
        // Offsets from the Linux boot protocol (Documentation/arch/x86/zero-page.rst, boot.rst).
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(ZERO_PAGE_START + 0x70))
                .unwrap(),
            ACPI_START
        );
        assert_eq!(rd8(0x1e8), 4);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(ZERO_PAGE_START + 0x1fe))
                .unwrap(),
            0xaa55
        );
        assert_eq!(rd32(0x202), 0x5372_6448);
        assert_eq!(rd8(0x210), 0xff);
        assert_eq!(rd32(0x218), 0x0f00_0000);
        assert_eq!(rd32(0x21c), 0x1234);
        assert_eq!(rd32(0x228), CMDLINE_START as u32);
        assert_eq!(rd32(0x238), 12);
        // Second e820 entry at 0x2d0 + 20.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(ZERO_PAGE_START + 0x2d0 + 20))
                .unwrap(),
            ACPI_START
        );
        assert_eq!(rd32(0x2d0 + 20 + 16), 2);
    }

    #[test]
    fn initramfs_goes_to_top_of_low_ram_and_rejects_overflow() {
        let dir = std::env::temp_dir().join(format!("iovmm-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![0xabu8; 5000]).unwrap();
        let mem = create_guest_memory(&[(0, 16 << 20)]).unwrap();
        let (addr, size) =
            load_initramfs(&mem, &dir, 16 << 20, 0x20_0000, INITRD_ADDR_MAX).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, ((16 << 20) - 5000) & !0xfff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0xab);
        let e =
            load_initramfs(&mem, &dir, 16 << 20, (16 << 20) - 100, INITRD_ADDR_MAX).unwrap_err();
        assert!(matches!(e, BootError::InitramfsTooLarge { .. }));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn garbage_kernel_is_rejected_with_a_clear_error() {
        let p = std::env::temp_dir().join(format!("iovmm-badkernel-{}", std::process::id()));
        std::fs::write(&p, vec![0x55u8; 8192]).unwrap();
        let mem = create_guest_memory(&[(0, 16 << 20)]).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(e.to_string().contains("not a loadable"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        load_cmdline(&mem, "console=ttyS0").unwrap();
        let mut b = [0u8; 14];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        assert!(load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }
}
