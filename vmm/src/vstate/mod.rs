//! Thin wrappers over KVM state: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod vcpu;

pub mod vm;
