//! iovmm: a minimal KVM VMM whose vIOMMUs protect DMA done by external
//! vhost-user backends.
#![warn(missing_docs)]

pub mod arch;
pub mod config;
pub mod vstate;
