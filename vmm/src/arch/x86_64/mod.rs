//! x86_64 platform: memory layout, boot protocol, vCPU registers, ACPI.

pub mod acpi;
pub mod boot;
pub mod dmar;
pub mod layout;
pub mod regs;
pub mod viot;
