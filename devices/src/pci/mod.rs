//! PCI: configuration space, MSI-X, the root complex (ECAM and 0xCF8/0xCFC).
