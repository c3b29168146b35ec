//! Virtio: the device trait and the modern virtio-pci transport.
