//! Virtio transports. Only the modern (virtio 1.x) PCI transport exists.
