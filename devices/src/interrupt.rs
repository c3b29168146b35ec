//! Interrupt delivery seams between devices and the hypervisor.
//!
//! iovmm runs KVM with a *split* irqchip: local APICs live in KVM, the IOAPIC
//! and every MSI source live in userspace. All interrupts therefore end up as
//! MSI messages. Devices raise them through [`MsiSink`]; vectors whose
//! interrupts are raised outside the VMM (vhost-user call fds) are wired with
//! irqfds through [`IrqfdRouter`].

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as programmed by the guest (address/data pair).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (0xFEEx_xxxx on x86, or a remappable-format address).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Delivers MSI messages to the guest (KVM_SIGNAL_MSI in the VMM).
pub trait MsiSink: Send + Sync {
    /// Injects one MSI.
    fn signal_msi(&self, msg: MsiMessage) -> io::Result<()>;
}

/// Routes an eventfd to an MSI without a VMM round trip (KVM irqfd + GSI route).
pub trait IrqfdRouter: Send + Sync {
    /// Allocates a GSI for an irqfd-backed vector.
    fn allocate_gsi(&self) -> io::Result<u32>;
    /// Points `gsi` at `msg`; `None` disables the route (masked vector).
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
    /// Makes a write to `fd` raise `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes [`IrqfdRouter::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}
