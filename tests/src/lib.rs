//! iovmm integration-test helpers: real KVM guests and real backends.

pub mod backend;
pub mod bench;
pub mod blk;
pub mod dpdk;
pub mod guest;
pub mod matrix;
pub mod nested;
pub mod ovs;
pub mod qemu;
pub mod rig;
