//! Domains, the endpoint table and the bypass policy: the state a paravirtual IOMMU keeps
//! between requests, and the [`DmaTranslate`] implementation over all of it.
//!
//! Every mutation validates first and changes nothing on error, and returns the
//! [`IommuEvent`]s its consumers must see *before* the guest learns that the operation
//! completed (see [`crate::notifier`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::address_space::{AddressSpace, AddressSpaceError, Mapping, MAX_MAPPINGS};
use crate::notifier::IommuEvent;
use crate::translate::{
    identity_with_extent, request_range, DmaTranslate, TranslateError, Translation,
};
use crate::types::{Access, DomainId, Iova, IovaRange, RequesterId, ReservedKind, ReservedRegion};

/// Default limit of simultaneously existing domains.
pub const MAX_DOMAINS: usize = 1 << 16;
/// Default limit of endpoints managed by one IOMMU (one PCI segment's worth of BDFs).
pub const MAX_ENDPOINTS: usize = 1 << 16;
/// Default limit of mappings summed over all domains.
pub const MAX_TOTAL_MAPPINGS: usize = 1 << 20;

/// Errors of domain and endpoint operations. `crate::virtio` maps them onto status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The endpoint is not managed by this IOMMU.
    #[error("endpoint {0} is not behind this IOMMU")]
    UnknownEndpoint(RequesterId),
    /// Too many endpoints registered.
    #[error("cannot manage more than {limit} endpoints")]
    TooManyEndpoints {
        /// The limit.
        limit: usize,
    },
    /// The domain does not exist (no endpoint attached to it).
    #[error("{0} does not exist; attach an endpoint to create it")]
    UnknownDomain(DomainId),
    /// DETACH names a domain the endpoint is not attached to.
    #[error("endpoint {rid} is not attached to {domain}")]
    NotAttachedTo {
        /// The endpoint.
        rid: RequesterId,
        /// The domain named by the request.
        domain: DomainId,
    },
    /// ATTACH's bypass flag disagrees with the existing domain's kind.
    #[error("{domain} exists with bypass={existing}; attach with the same bypass flag")]
    BypassMismatch {
        /// The domain.
        domain: DomainId,
        /// Its bypass flag.
        existing: bool,
    },
    /// MAP/UNMAP on a bypass domain.
    #[error("{0} is a bypass domain and has no mappings")]
    BypassDomain(DomainId),
    /// Too many domains.
    #[error("cannot create more than {limit} domains")]
    TooManyDomains {
        /// The limit.
        limit: usize,
    },
    /// Too many mappings over all domains.
    #[error("all domains together already hold {limit} mappings")]
    TooManyMappings {
        /// The limit.
        limit: usize,
    },
    /// MAP over a reserved region.
    #[error("mapping {range} overlaps reserved region {reserved}; the driver must not map there")]
    ReservedOverlap {
        /// The requested range.
        range: IovaRange,
        /// The reserved region.
        reserved: IovaRange,
    },
    /// A mapping-table error.
    #[error(transparent)]
    Mapping(#[from] AddressSpaceError),
}

/// Limits and policy of a [`Domains`] table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainsConfig {
    /// Maximum number of domains.
    pub max_domains: usize,
    /// Maximum number of endpoints.
    pub max_endpoints: usize,
    /// Maximum mappings per domain.
    pub max_mappings_per_domain: usize,
    /// Maximum mappings over all domains.
    pub max_total_mappings: usize,
    /// Global bypass of unattached endpoints at power-on and after a system reset.
    pub boot_bypass: bool,
    /// Last address identity extents reach (e.g. the last byte of guest RAM).
    pub identity_limit: u64,
    /// Reserved regions of every endpoint (x86: the MSI window).
    pub reserved: Vec<ReservedRegion>,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        Self {
            max_domains: MAX_DOMAINS,
            max_endpoints: MAX_ENDPOINTS,
            max_mappings_per_domain: MAX_MAPPINGS,
            max_total_mappings: MAX_TOTAL_MAPPINGS,
            boot_bypass: false,
            identity_limit: u64::MAX,
            reserved: vec![ReservedRegion::x86_msi()],
        }
    }
}

/// One domain: an address space shared by its endpoints, or a bypass (identity) domain.
#[derive(Debug, Clone)]
pub struct Domain {
    id: DomainId,
    bypass: bool,
    space: AddressSpace,
    endpoints: BTreeSet<RequesterId>,
}

impl Domain {
    /// The domain id.
    pub fn id(&self) -> DomainId {
        self.id
    }

    /// Whether this is a bypass (identity) domain.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// The mapping table.
    pub fn address_space(&self) -> &AddressSpace {
        &self.space
    }

    /// The attached endpoints.
    pub fn endpoints(&self) -> impl Iterator<Item = RequesterId> + '_ {
        self.endpoints.iter().copied()
    }
}

/// The endpoints managed by the IOMMU and the domain each is attached to.
#[derive(Debug, Clone, Default)]
pub struct EndpointTable {
    attached: BTreeMap<RequesterId, Option<DomainId>>,
}

impl EndpointTable {
    /// `Some(domain or None)` for a known endpoint, `None` for an unknown one.
    pub fn get(&self, rid: RequesterId) -> Option<Option<DomainId>> {
        self.attached.get(&rid).copied()
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.attached.len()
    }

    /// Whether no endpoint is registered.
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    /// Every endpoint with its domain.
    pub fn iter(&self) -> impl Iterator<Item = (RequesterId, Option<DomainId>)> + '_ {
        self.attached.iter().map(|(r, d)| (*r, *d))
    }
}

/// All domains and endpoints of one paravirtual IOMMU.
#[derive(Debug, Clone)]
pub struct Domains {
    config: DomainsConfig,
    domains: BTreeMap<DomainId, Domain>,
    endpoints: EndpointTable,
    bypass: bool,
    total_mappings: usize,
}

impl Default for Domains {
    fn default() -> Self {
        Self::new(DomainsConfig::default())
    }
}

impl Domains {
    /// An empty table; global bypass starts as `config.boot_bypass`.
    pub fn new(config: DomainsConfig) -> Self {
        let bypass = config.boot_bypass;
        Self {
            config,
            domains: BTreeMap::new(),
            endpoints: EndpointTable::default(),
            bypass,
            total_mappings: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DomainsConfig {
        &self.config
    }

    /// Registers an endpoint (a device behind this IOMMU). Idempotent.
    pub fn add_endpoint(&mut self, rid: RequesterId) -> Result<(), DomainError> {
        if self.endpoints.get(rid).is_some() {
            return Ok(());
        }
        if self.endpoints.len() >= self.config.max_endpoints {
            return Err(DomainError::TooManyEndpoints {
                limit: self.config.max_endpoints,
            });
        }
        self.endpoints.attached.insert(rid, None);
        Ok(())
    }

    /// Unregisters an endpoint (hot-unplug), detaching it first.
    pub fn remove_endpoint(&mut self, rid: RequesterId) -> Vec<IommuEvent> {
        let Some(current) = self.endpoints.get(rid) else {
            return Vec::new();
        };
        if let Some(old) = current {
            self.leave(rid, old);
        }
        self.endpoints.attached.remove(&rid);
        vec![IommuEvent::DetachEndpoint { rid }]
    }

    /// The endpoint table.
    pub fn endpoints(&self) -> &EndpointTable {
        &self.endpoints
    }

    /// The domain `rid` is attached to.
    pub fn endpoint_domain(&self, rid: RequesterId) -> Option<DomainId> {
        self.endpoints.get(rid).flatten()
    }

    /// A domain by id.
    pub fn domain(&self, id: DomainId) -> Option<&Domain> {
        self.domains.get(&id)
    }

    /// Number of existing domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Mappings summed over all domains.
    pub fn total_mappings(&self) -> usize {
        self.total_mappings
    }

    /// The reserved regions of `rid` (the same for every endpoint here).
    pub fn reserved_regions(&self, _rid: RequesterId) -> &[ReservedRegion] {
        &self.config.reserved
    }

    /// Whether unattached endpoints bypass translation.
    pub fn global_bypass(&self) -> bool {
        self.bypass
    }

    /// Changes the global bypass policy. Turning it off takes the identity translations away
    /// from every unattached endpoint, so they get [`IommuEvent::DetachEndpoint`].
    pub fn set_global_bypass(&mut self, bypass: bool) -> Vec<IommuEvent> {
        let was = std::mem::replace(&mut self.bypass, bypass);
        if !was || bypass {
            return Vec::new();
        }
        self.endpoints
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(rid, _)| IommuEvent::DetachEndpoint { rid })
            .collect()
    }

    /// Attaches `rid` to `domain` (created if missing, as a bypass domain if `bypass`), first
    /// detaching it from its current domain (freed if that empties it).
    pub fn attach(
        &mut self,
        rid: RequesterId,
        domain: DomainId,
        bypass: bool,
    ) -> Result<Vec<IommuEvent>, DomainError> {
        let current = self
            .endpoints
            .get(rid)
            .ok_or(DomainError::UnknownEndpoint(rid))?;
        self.check_attach(current, domain, bypass)?;
        if current == Some(domain) {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        if current.is_some() || self.bypass {
            events.push(IommuEvent::DetachEndpoint { rid });
        }
        if let Some(old) = current {
            self.leave(rid, old);
        }
        let limit = self.config.max_mappings_per_domain;
        let dom = self.domains.entry(domain).or_insert_with(|| Domain {
            id: domain,
            bypass,
            space: AddressSpace::new(limit),
            endpoints: BTreeSet::new(),
        });
        dom.endpoints.insert(rid);
        self.endpoints.attached.insert(rid, Some(domain));
        events.extend(dom.space.iter().filter_map(|m| map_event(rid, m)));
        Ok(events)
    }

    /// Detaches `rid` from `domain`; the domain disappears with its last endpoint.
    pub fn detach(
        &mut self,
        rid: RequesterId,
        domain: DomainId,
    ) -> Result<Vec<IommuEvent>, DomainError> {
        let current = self
            .endpoints
            .get(rid)
            .ok_or(DomainError::UnknownEndpoint(rid))?;
        if current != Some(domain) {
            return Err(DomainError::NotAttachedTo { rid, domain });
        }
        self.leave(rid, domain);
        Ok(vec![IommuEvent::DetachEndpoint { rid }])
    }

    /// Adds a mapping to `domain`; returns `Map` events for its endpoints (none for MMIO).
    pub fn map(
        &mut self,
        domain: DomainId,
        mapping: Mapping,
    ) -> Result<Vec<IommuEvent>, DomainError> {
        let total_limit = self.config.max_total_mappings;
        let full = self.total_mappings >= total_limit;
        let reserved = self
            .config
            .reserved
            .iter()
            .find(|r| r.range.intersects(mapping.range()))
            .map(|r| r.range);
        let dom = self.mapping_domain(domain)?;
        if let Some(reserved) = reserved {
            return Err(DomainError::ReservedOverlap {
                range: mapping.range(),
                reserved,
            });
        }
        if full {
            // Report overlap first if there is one: it is the more specific error.
            if let Some(existing) = dom.space.first_overlap(mapping.range()) {
                return Err(AddressSpaceError::Overlap {
                    new: mapping.range(),
                    existing: existing.range(),
                }
                .into());
            }
            return Err(DomainError::TooManyMappings { limit: total_limit });
        }
        dom.space.map(mapping)?;
        let events = dom
            .endpoints()
            .filter_map(|rid| map_event(rid, &mapping))
            .collect();
        self.total_mappings += 1;
        Ok(events)
    }

    /// Removes the mappings wholly inside `range` from `domain` (see
    /// [`AddressSpace::unmap`]); returns one `Unmap` per endpoint covering what was removed.
    pub fn unmap(
        &mut self,
        domain: DomainId,
        range: IovaRange,
    ) -> Result<Vec<IommuEvent>, DomainError> {
        let dom = self.mapping_domain(domain)?;
        let removed = dom.space.unmap(range)?;
        let (Some(first), Some(last)) = (removed.first(), removed.last()) else {
            return Ok(Vec::new());
        };
        let covered = first.range().hull(last.range());
        let events = dom
            .endpoints()
            .map(|rid| IommuEvent::Unmap {
                rid,
                range: covered,
            })
            .collect();
        self.total_mappings = self.total_mappings.saturating_sub(removed.len());
        Ok(events)
    }

    /// Device reset: every domain disappears and every endpoint is unattached. The global
    /// bypass setting survives (virtio-iommu: `bypass` is kept across device reset).
    pub fn reset(&mut self) -> Vec<IommuEvent> {
        self.domains.clear();
        self.total_mappings = 0;
        for d in self.endpoints.attached.values_mut() {
            *d = None;
        }
        vec![IommuEvent::Reset]
    }

    /// System reset: [`Domains::reset`] plus restoring the boot bypass setting.
    pub fn system_reset(&mut self) -> Vec<IommuEvent> {
        self.bypass = self.config.boot_bypass;
        self.reset()
    }

    fn check_attach(
        &self,
        current: Option<DomainId>,
        domain: DomainId,
        bypass: bool,
    ) -> Result<(), DomainError> {
        if let Some(existing) = self.domains.get(&domain) {
            if existing.bypass != bypass {
                return Err(DomainError::BypassMismatch {
                    domain,
                    existing: existing.bypass,
                });
            }
            return Ok(());
        }
        let frees_old = current
            .and_then(|old| self.domains.get(&old))
            .is_some_and(|old| old.endpoints.len() == 1);
        if self.domains.len() - usize::from(frees_old) >= self.config.max_domains {
            return Err(DomainError::TooManyDomains {
                limit: self.config.max_domains,
            });
        }
        Ok(())
    }

    fn mapping_domain(&mut self, domain: DomainId) -> Result<&mut Domain, DomainError> {
        let dom = self
            .domains
            .get_mut(&domain)
            .ok_or(DomainError::UnknownDomain(domain))?;
        if dom.bypass {
            return Err(DomainError::BypassDomain(domain));
        }
        Ok(dom)
    }

    /// Removes `rid` from `domain`, freeing the domain if it became empty.
    fn leave(&mut self, rid: RequesterId, domain: DomainId) {
        if let Some(dom) = self.domains.get_mut(&domain) {
            dom.endpoints.remove(&rid);
            if dom.endpoints.is_empty() {
                self.total_mappings = self.total_mappings.saturating_sub(dom.space.len());
                self.domains.remove(&domain);
            }
        }
        self.endpoints.attached.insert(rid, None);
    }

    /// Identity translation of `req`, with the extent bounded by the identity limit and by the
    /// `Reserved` regions around it; fails if `req` touches a `Reserved` region.
    fn identity(&self, req: IovaRange) -> Result<Translation, TranslateError> {
        let limit = self.config.identity_limit;
        let (mut lo, mut hi) = if req.start() <= limit {
            (0, limit.max(req.end()))
        } else {
            (req.start(), req.end())
        };
        for r in self.blocking_regions() {
            if r.intersects(req) {
                let first = r.start().max(req.start());
                return Err(TranslateError::Unmapped { iova: Iova(first) });
            }
            if r.end() < req.start() {
                lo = lo.max(r.end() + 1);
            } else {
                hi = hi.min(r.start() - 1);
            }
        }
        let extent = IovaRange::new(lo, hi).unwrap_or(req);
        Ok(identity_with_extent(req, extent))
    }

    /// Reserved regions decide `req` on their own: MSI windows translate to identity,
    /// `Reserved` regions fault. `None` when `req` starts outside every reserved region.
    fn translate_reserved(&self, req: IovaRange) -> Option<Result<Translation, TranslateError>> {
        let region = self
            .config
            .reserved
            .iter()
            .find(|r| r.range.contains(req.start()))?;
        Some(match region.kind {
            ReservedKind::Reserved => Err(TranslateError::Unmapped {
                iova: Iova(req.start()),
            }),
            ReservedKind::Msi if region.range.contains_range(req) => {
                Ok(identity_with_extent(req, region.range))
            }
            ReservedKind::Msi => Err(TranslateError::Unmapped {
                iova: Iova(region.range.end().saturating_add(1)),
            }),
        })
    }

    fn blocking_regions(&self) -> impl Iterator<Item = IovaRange> + '_ {
        self.config
            .reserved
            .iter()
            .filter(|r| r.kind == ReservedKind::Reserved)
            .map(|r| r.range)
    }
}

fn map_event(rid: RequesterId, m: &Mapping) -> Option<IommuEvent> {
    (!m.mmio()).then(|| IommuEvent::Map {
        rid,
        range: m.range(),
        gpa: m.gpa(),
        perm: m.perm(),
    })
}

impl DmaTranslate for Domains {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        let req = request_range(iova, len)?;
        let attached = self
            .endpoints
            .get(rid)
            .ok_or(TranslateError::UnknownEndpoint { rid })?;
        if let Some(result) = self.translate_reserved(req) {
            return result;
        }
        let domain = match attached {
            None if self.bypass => return self.identity(req),
            None => return Err(TranslateError::NotAttached { rid }),
            Some(id) => self
                .domains
                .get(&id)
                .ok_or(TranslateError::NotAttached { rid })?,
        };
        if domain.bypass {
            return self.identity(req);
        }
        domain.space.translate(iova, len, access)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::types::Permissions;
    use vm_memory::GuestAddress;

    fn rid(n: u16) -> RequesterId {
        RequesterId::from_bdf(0, n)
    }

    fn r(s: u64, e: u64) -> IovaRange {
        IovaRange::new(s, e).unwrap()
    }

    fn mapping(s: u64, e: u64, gpa: u64) -> Mapping {
        Mapping::new(r(s, e), GuestAddress(gpa), Permissions::ReadWrite).unwrap()
    }

    fn with_endpoints(config: DomainsConfig, n: u16) -> Domains {
        let mut d = Domains::new(config);
        for i in 0..n {
            d.add_endpoint(rid(i)).unwrap();
        }
        d
    }

    #[test]
    fn attach_to_new_domain_moves_endpoint_and_frees_empty_old_domain() {
        let mut d = with_endpoints(DomainsConfig::default(), 2);
        d.attach(rid(0), DomainId(1), false).unwrap();
        d.map(DomainId(1), mapping(0x1000, 0x1fff, 0x5000)).unwrap();
        assert_eq!(d.total_mappings(), 1);
        let ev = d.attach(rid(0), DomainId(2), false).unwrap();
        assert_eq!(ev, vec![IommuEvent::DetachEndpoint { rid: rid(0) }]);
        assert!(d.domain(DomainId(1)).is_none());
        assert_eq!(d.total_mappings(), 0);
        assert_eq!(d.endpoint_domain(rid(0)), Some(DomainId(2)));
    }

    #[test]
    fn attach_replays_existing_mappings_as_map_events() {
        let mut d = with_endpoints(DomainsConfig::default(), 2);
        d.attach(rid(0), DomainId(1), false).unwrap();
        d.map(DomainId(1), mapping(0x1000, 0x1fff, 0x5000)).unwrap();
        let ev = d.attach(rid(1), DomainId(1), false).unwrap();
        assert_eq!(
            ev,
            vec![IommuEvent::Map {
                rid: rid(1),
                range: r(0x1000, 0x1fff),
                gpa: GuestAddress(0x5000),
                perm: Permissions::ReadWrite
            }]
        );
    }

    #[test]
    fn shared_domain_survives_until_last_endpoint_detaches() {
        let mut d = with_endpoints(DomainsConfig::default(), 2);
        d.attach(rid(0), DomainId(7), false).unwrap();
        d.attach(rid(1), DomainId(7), false).unwrap();
        d.map(DomainId(7), mapping(0, 0xfff, 0)).unwrap();
        d.detach(rid(0), DomainId(7)).unwrap();
        assert_eq!(d.domain(DomainId(7)).unwrap().address_space().len(), 1);
        d.detach(rid(1), DomainId(7)).unwrap();
        assert!(d.domain(DomainId(7)).is_none());
        assert_eq!(
            d.map(DomainId(7), mapping(0, 0xfff, 0)),
            Err(DomainError::UnknownDomain(DomainId(7)))
        );
    }

    #[test]
    fn detach_from_wrong_domain_or_unknown_endpoint_fails() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        d.attach(rid(0), DomainId(1), false).unwrap();
        assert_eq!(
            d.detach(rid(0), DomainId(2)),
            Err(DomainError::NotAttachedTo {
                rid: rid(0),
                domain: DomainId(2)
            })
        );
        assert_eq!(
            d.detach(rid(9), DomainId(1)),
            Err(DomainError::UnknownEndpoint(rid(9)))
        );
    }

    #[test]
    fn map_and_unmap_emit_events_for_every_endpoint_of_the_domain() {
        let mut d = with_endpoints(DomainsConfig::default(), 2);
        d.attach(rid(0), DomainId(3), false).unwrap();
        d.attach(rid(1), DomainId(3), false).unwrap();
        assert_eq!(d.map(DomainId(3), mapping(0, 0xfff, 0)).unwrap().len(), 2);
        d.map(DomainId(3), mapping(0x3000, 0x3fff, 0)).unwrap();
        let ev = d.unmap(DomainId(3), r(0, 0xffff)).unwrap();
        assert_eq!(
            ev,
            vec![
                IommuEvent::Unmap {
                    rid: rid(0),
                    range: r(0, 0x3fff)
                },
                IommuEvent::Unmap {
                    rid: rid(1),
                    range: r(0, 0x3fff)
                }
            ]
        );
        assert!(d.unmap(DomainId(3), r(0, 0xffff)).unwrap().is_empty());
    }

    #[test]
    fn mmio_mappings_are_not_announced() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        d.attach(rid(0), DomainId(3), false).unwrap();
        let m = mapping(0, 0xfff, 0xd000_0000).with_mmio(true);
        assert!(d.map(DomainId(3), m).unwrap().is_empty());
    }

    #[test]
    fn bypass_domain_rules() {
        let mut d = with_endpoints(DomainsConfig::default(), 2);
        d.attach(rid(0), DomainId(1), true).unwrap();
        assert_eq!(
            d.attach(rid(1), DomainId(1), false),
            Err(DomainError::BypassMismatch {
                domain: DomainId(1),
                existing: true
            })
        );
        assert_eq!(
            d.map(DomainId(1), mapping(0, 0xfff, 0)),
            Err(DomainError::BypassDomain(DomainId(1)))
        );
        assert_eq!(
            d.unmap(DomainId(1), r(0, 0xfff)),
            Err(DomainError::BypassDomain(DomainId(1)))
        );
        let t = d
            .translate(rid(0), Iova(0x1234), 4, Permissions::Write)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x1234), 4)]);
    }

    #[test]
    fn unattached_endpoint_is_blocked_unless_global_bypass() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        assert_eq!(
            d.translate(rid(0), Iova(0x1000), 1, Permissions::Read),
            Err(TranslateError::NotAttached { rid: rid(0) })
        );
        assert!(d.set_global_bypass(true).is_empty());
        assert!(d
            .translate(rid(0), Iova(0x1000), 1, Permissions::Read)
            .is_ok());
        assert_eq!(
            d.set_global_bypass(false),
            vec![IommuEvent::DetachEndpoint { rid: rid(0) }]
        );
        assert_eq!(
            d.translate(rid(9), Iova(0), 1, Permissions::Read),
            Err(TranslateError::UnknownEndpoint { rid: rid(9) })
        );
    }

    #[test]
    fn msi_window_is_identity_and_not_mappable() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        d.attach(rid(0), DomainId(1), false).unwrap();
        let t = d
            .translate(rid(0), Iova(0xFEE0_1000), 4, Permissions::Write)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0xFEE0_1000), 4)]);
        assert_eq!(t.extent.iova, r(0xFEE0_0000, 0xFEEF_FFFF));
        assert!(matches!(
            d.map(DomainId(1), mapping(0xFEE0_0000, 0xFEE0_0FFF, 0)),
            Err(DomainError::ReservedOverlap { .. })
        ));
    }

    #[test]
    fn identity_extent_is_bounded_by_limit_and_reserved_regions() {
        let config = DomainsConfig {
            boot_bypass: true,
            identity_limit: 0x3fff_ffff,
            reserved: vec![ReservedRegion {
                range: r(0x1000_0000, 0x1000_ffff),
                kind: ReservedKind::Reserved,
            }],
            ..Default::default()
        };
        let d = with_endpoints(config, 1);
        let low = d
            .translate(rid(0), Iova(0x2000), 1, Permissions::Read)
            .unwrap();
        assert_eq!(low.extent.iova, r(0, 0x0fff_ffff));
        let high = d
            .translate(rid(0), Iova(0x2000_0000), 1, Permissions::Read)
            .unwrap();
        assert_eq!(high.extent.iova, r(0x1001_0000, 0x3fff_ffff));
        assert_eq!(
            d.translate(rid(0), Iova(0x0fff_ff00), 0x200, Permissions::Read),
            Err(TranslateError::Unmapped {
                iova: Iova(0x1000_0000)
            })
        );
        let beyond = d
            .translate(rid(0), Iova(0x8000_0000), 8, Permissions::Read)
            .unwrap();
        assert_eq!(beyond.extent.iova, r(0x8000_0000, 0x8000_0007));
    }

    #[test]
    fn limits_on_domains_endpoints_and_total_mappings() {
        let config = DomainsConfig {
            max_domains: 1,
            max_endpoints: 2,
            max_total_mappings: 1,
            ..Default::default()
        };
        let mut d = with_endpoints(config, 2);
        assert_eq!(
            d.add_endpoint(rid(5)),
            Err(DomainError::TooManyEndpoints { limit: 2 })
        );
        d.attach(rid(0), DomainId(1), false).unwrap();
        assert_eq!(
            d.attach(rid(1), DomainId(2), false),
            Err(DomainError::TooManyDomains { limit: 1 })
        );
        // Moving the only endpoint frees its domain, so the new one fits.
        d.attach(rid(0), DomainId(2), false).unwrap();
        d.map(DomainId(2), mapping(0, 0xfff, 0)).unwrap();
        assert_eq!(
            d.map(DomainId(2), mapping(0x1000, 0x1fff, 0)),
            Err(DomainError::TooManyMappings { limit: 1 })
        );
    }

    #[test]
    fn reset_keeps_bypass_and_system_reset_restores_boot_value() {
        let config = DomainsConfig {
            boot_bypass: true,
            ..Default::default()
        };
        let mut d = with_endpoints(config, 1);
        d.attach(rid(0), DomainId(1), false).unwrap();
        d.set_global_bypass(false);
        assert_eq!(d.reset(), vec![IommuEvent::Reset]);
        assert!(!d.global_bypass());
        assert_eq!(d.endpoint_domain(rid(0)), None);
        assert_eq!(d.domain_count(), 0);
        d.system_reset();
        assert!(d.global_bypass());
    }

    #[test]
    fn removing_an_endpoint_detaches_it() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        d.attach(rid(0), DomainId(1), false).unwrap();
        assert_eq!(
            d.remove_endpoint(rid(0)),
            vec![IommuEvent::DetachEndpoint { rid: rid(0) }]
        );
        assert_eq!(d.domain_count(), 0);
        assert!(d.remove_endpoint(rid(0)).is_empty());
    }

    #[test]
    fn translate_through_domain_mappings() {
        let mut d = with_endpoints(DomainsConfig::default(), 1);
        d.attach(rid(0), DomainId(1), false).unwrap();
        let ro = Mapping::new(r(0x1000, 0x1fff), GuestAddress(0x9000), Permissions::Read).unwrap();
        d.map(DomainId(1), ro).unwrap();
        let t = d
            .translate(rid(0), Iova(0x1100), 0x10, Permissions::Read)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x9100), 0x10)]);
        assert!(matches!(
            d.translate(rid(0), Iova(0x1100), 0x10, Permissions::Write),
            Err(TranslateError::PermissionDenied {
                allowed: Permissions::Read,
                ..
            })
        ));
        assert_eq!(
            d.translate(rid(0), Iova(0x2000), 1, Permissions::Read),
            Err(TranslateError::Unmapped { iova: Iova(0x2000) })
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Attach(u16, u32, bool),
        Detach(u16, u32),
        Map(u32, u64),
        Unmap(u32, u64, u64),
        Reset,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u16..4, 0u32..4, any::<bool>()).prop_map(|(e, d, b)| Op::Attach(e, d, b)),
            (0u16..4, 0u32..4).prop_map(|(e, d)| Op::Detach(e, d)),
            (0u32..4, 0u64..16).prop_map(|(d, p)| Op::Map(d, p)),
            (0u32..4, 0u64..16, 0u64..16).prop_map(|(d, s, l)| Op::Unmap(d, s, l)),
            Just(Op::Reset),
        ]
    }

    fn check_invariants(d: &Domains) {
        let sum: usize = d.domains.values().map(|x| x.space.len()).sum();
        assert_eq!(d.total_mappings(), sum);
        for dom in d.domains.values() {
            assert!(!dom.endpoints.is_empty(), "empty domains are freed");
            for ep in dom.endpoints() {
                assert_eq!(d.endpoint_domain(ep), Some(dom.id()));
            }
        }
        for (ep, dom) in d.endpoints().iter() {
            if let Some(id) = dom {
                assert!(d.domain(id).unwrap().endpoints.contains(&ep));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn bookkeeping_stays_consistent(ops in proptest::collection::vec(op(), 1..60)) {
            let mut d = with_endpoints(DomainsConfig::default(), 4);
            for op in ops {
                let _ = match op {
                    Op::Attach(e, id, b) => d.attach(rid(e), DomainId(id), b),
                    Op::Detach(e, id) => d.detach(rid(e), DomainId(id)),
                    Op::Map(id, p) => d.map(DomainId(id), mapping(p * 0x1000, p * 0x1000 + 0xfff, 0)),
                    Op::Unmap(id, s, l) => d.unmap(DomainId(id), r(s * 0x1000, (s + l) * 0x1000 + 0xfff)),
                    Op::Reset => Ok(d.reset()),
                };
                check_invariants(&d);
            }
        }
    }
}
