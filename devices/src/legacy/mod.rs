//! Legacy platform devices: serial console, IOAPIC, reset and power-off paths.
