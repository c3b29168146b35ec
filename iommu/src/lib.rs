//! Pure IOMMU models for iovmm: no KVM, no threads, no sockets, no queue I/O. Everything here
//! is deterministic state plus functions over it, so it is unit-testable on any machine.
//!
//! # The model: requester → domain → address space → events
//!
//! * A **requester** ([`RequesterId`]) is a DMA-capable function, named by PCI segment and BDF.
//!   virtio-iommu calls it an *endpoint* (its endpoint id is `segment << 16 | bdf`, matching the
//!   VIOT table this VMM writes), VT-d a *source id*.
//! * Each known requester is attached to at most one **domain** ([`domain::Domains`]). Several
//!   requesters may share a domain; a domain disappears with its last requester. A requester
//!   that is not attached is either *blocked* or in *bypass* (identity), depending on the global
//!   bypass policy; a domain may itself be a bypass (identity) domain.
//! * A translating domain owns an **address space** ([`address_space::AddressSpace`]): a table of
//!   non-overlapping IOVA → GPA mappings with permissions. Lookups are `O(log n)`. Reserved
//!   regions (the x86 MSI window `0xFEE00000-0xFEEFFFFF`) cannot be mapped; DMA into the MSI
//!   window is an interrupt and translates to itself.
//! * Devices **pull** translations through [`DmaTranslate`]: `(rid, iova, len, access)` →
//!   guest-physical fragments, the permission, and the *extent*, the largest range around the
//!   lookup that translates linearly with the same permission (adjacent mappings that continue
//!   each other are merged, boundedly). A vhost-user back end's IOTLB miss can then be answered
//!   with one UPDATE covering the whole extent instead of one page. Identity translations
//!   (bypass, pass-through) report extents bounded by a configured limit such as the end of RAM.
//! * Models **push** changes as [`IommuEvent`]s: every mutating operation returns the events
//!   its consumers must see (`Map`, `Unmap`, `DetachEndpoint`, `Reset`, and for VT-d with ATS
//!   `DevIotlbUnmap`). The owner delivers them through a [`NotifierSet`], keyed by requester.
//!
//! # The notifier contract
//!
//! Unmapping is only finished when nobody can still use the translation. Therefore:
//!
//! 1. An unmap-type event (`Unmap`, `DevIotlbUnmap`, `DetachEndpoint`, `Reset`) is delivered
//!    synchronously; a consumer returns from [`IommuNotifier::notify`] only after it dropped the
//!    covered translations (vhost-user: after the back end acked the IOTLB INVALIDATE).
//! 2. The vIOMMU completes the guest-visible operation (the virtio-iommu used buffer, the VT-d
//!    invalidation wait descriptor) only after the fan-out returned.
//! 3. Failures are collected, not short-circuited: every consumer is still notified and all
//!    errors are reported together ([`notifier::NotifierError::Delivery`]).
//! 4. A consumer must make "translate, then install the translation" atomic with respect to
//!    notifications for the same requester (e.g. one lock held across the miss lookup and the
//!    UPDATE, taken by `notify` too). Otherwise an UPDATE computed just before an unmap can reach
//!    the back end after the unmap's INVALIDATE and outlive the guest's UNMAP.
//! 5. Consumers choose between IOTLB (`UNMAP`) and device-TLB (`DEVIOTLB_UNMAP`) invalidations.
//!    A vIOMMU may reject flags it cannot honour (virtio-iommu has no device TLB);
//!    [`NotifierSet::register_with_fallback`] then registers `UNMAP`. A device-TLB registration is
//!    only correct while the guest has ATS enabled on the endpoint, so it must follow the guest's
//!    ATS toggles ([`NotifierSet::switch_unmap_kind`]).
//!
//! # Modules
//!
//! * [`types`]: `Iova`, `RequesterId`, `IovaRange`, `DomainId`, permissions, reserved regions.
//! * [`translate`]: the `DmaTranslate` trait, `Translation`/`Extent`, pass-through.
//! * [`notifier`]: events, the consumer trait, flags and the fan-out set.
//! * [`address_space`]: one domain's mapping table.
//! * [`domain`]: domains, endpoints, bypass policy; `DmaTranslate` for all of it.
//! * [`virtio`]: the virtio-iommu wire format, config space and request execution.
//! * [`error`]: [`error::chain`], an error with its causes for messages and logs.
//! * [`ratelimit`]: rate-limited logging for lines a guest or a back end can trigger.
//! * [`sync`]: poison-tolerant `lock` / `read` / `write`, used by every crate of the workspace.
#![warn(missing_docs)]

pub mod address_space;
pub mod domain;
pub mod error;
pub mod notifier;
pub mod ratelimit;
pub mod sync;
pub mod translate;
pub mod types;
pub mod virtio;
pub mod vtd;

pub use address_space::{AddressSpace, AddressSpaceError, Mapping};
pub use domain::{DomainError, Domains, DomainsConfig};
pub use notifier::{
    IommuEvent, IommuNotifier, NotifierError, NotifierFlags, NotifierHandle, NotifierSet,
    NotifyError, UnmapKind,
};
pub use translate::{DmaTranslate, Extent, Passthrough, TranslateError, Translation};
pub use types::{Access, DomainId, Iova, IovaRange, Permissions, RequesterId};
