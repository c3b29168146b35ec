//! placeholder
#![warn(missing_docs)]

pub mod address_space;
pub mod domain;
pub mod notifier;
pub mod translate;
pub mod types;
pub mod virtio;
