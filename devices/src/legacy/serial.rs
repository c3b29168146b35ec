//! A 16550A UART (the guest console, COM1 at 0x3F8).
//!
//! Transmission is instantaneous: a byte written to THR goes straight to the
//! output writer, so THR is always empty (LSR.THRE and LSR.TEMT always set).
//! Input from the host is queued with [`Serial::enqueue_input`] into a bounded
//! receive FIFO of [`SERIAL_INPUT_CAPACITY`] bytes.
//!
//! Interrupts follow the 16550 rules and drive an [`IrqLine`] level: the
//! line is high while an interrupt enabled in IER is pending (receiver line
//! status, received data available, THR empty - in that priority order, as
//! IIR reports them). The THR-empty interrupt is raised when the guest
//! enables it in IER or writes THR, and is cleared by reading IIR while it is
//! the reported source, as on real hardware. Modem-status interrupts never
//! fire (the modem lines do not change, MSR has no delta bits) and MCR.OUT2
//! does not gate the line.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::legacy::IrqLine;

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3F8;
/// Number of I/O ports of one UART.
pub const SERIAL_PORT_LEN: u64 = 8;
/// IOAPIC pin (ISA IRQ) of COM1.
pub const COM1_IRQ: usize = 4;
/// Bytes the receive FIFO holds; [`Serial::enqueue_input`] accepts no more.
pub const SERIAL_INPUT_CAPACITY: usize = 64;

// Register offsets.
const DATA: u64 = 0; // RBR (read) / THR (write); DLL when LCR.DLAB
const IER: u64 = 1; // DLM when LCR.DLAB
const IIR_FCR: u64 = 2; // IIR (read) / FCR (write)
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

// IER bits.
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MASK: u8 = 0x0F;

// IIR values.
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xC0;

// FCR bits.
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

// MCR bits.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1F;

// LSR bits.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

// MSR bits.
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Divisor latch after reset: 115200 / 12 = 9600 baud.
const DEFAULT_DIVISOR: u16 = 12;

/// A 16550A UART model.
pub struct Serial {
    out: Box<dyn Write + Send>,
    irq: Option<Arc<dyn IrqLine>>,
    irq_high: bool,
    rx: VecDeque<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
    fcr: u8,
    scr: u8,
    divisor: u16,
    overrun: bool,
    thre_pending: bool,
    bytes_written: u64,
    write_error_logged: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("ier", &self.ier)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("rx_len", &self.rx.len())
            .field("bytes_written", &self.bytes_written)
            .finish()
    }
}

impl Serial {
    /// Creates a UART writing guest output to `out` and signalling `irq`
    /// (`None`: polled mode only).
    pub fn new(out: Box<dyn Write + Send>, irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            out,
            irq,
            irq_high: false,
            rx: VecDeque::with_capacity(SERIAL_INPUT_CAPACITY),
            ier: 0,
            lcr: 0x03, // 8N1
            mcr: MCR_OUT2,
            fcr: 0,
            scr: 0,
            divisor: DEFAULT_DIVISOR,
            overrun: false,
            thre_pending: false,
            bytes_written: 0,
            write_error_logged: false,
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted (the
    /// receive FIFO holds [`SERIAL_INPUT_CAPACITY`] bytes). The caller retries
    /// the rest later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = SERIAL_INPUT_CAPACITY.saturating_sub(self.rx.len());
        let taken = room.min(bytes.len());
        self.rx.extend(&bytes[..taken]);
        self.update_irq();
        taken
    }

    /// Free space of the receive FIFO.
    pub fn input_room(&self) -> usize {
        SERIAL_INPUT_CAPACITY.saturating_sub(self.rx.len())
    }

    /// Bytes the guest has sent to the output writer.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Baud rate divisor programmed by the guest (divides 115200).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// The highest-priority pending interrupt enabled in IER, as an IIR code.
    fn pending_interrupt(&self) -> u8 {
        if self.ier & IER_RLS != 0 && self.overrun {
            IIR_RLS
        } else if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    fn update_irq(&mut self) {
        let high = self.pending_interrupt() != IIR_NONE;
        if high != self.irq_high {
            self.irq_high = high;
            if let Some(irq) = &self.irq {
                irq.set_level(high);
            }
        }
    }

    fn read_iir(&mut self) -> u8 {
        let code = self.pending_interrupt();
        if code == IIR_THRE {
            self.thre_pending = false;
        }
        let fifo = if self.fcr & FCR_ENABLE != 0 {
            IIR_FIFO_ENABLED
        } else {
            0
        };
        code | fifo
    }

    fn read_lsr(&mut self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
            self.overrun = false;
        }
        lsr
    }

    fn read_msr(&self) -> u8 {
        if self.loopback() {
            let mut msr = 0;
            for (mcr_bit, msr_bit) in [
                (MCR_RTS, MSR_CTS),
                (MCR_DTR, MSR_DSR),
                (MCR_OUT1, MSR_RI),
                (MCR_OUT2, MSR_DCD),
            ] {
                if self.mcr & mcr_bit != 0 {
                    msr |= msr_bit;
                }
            }
            msr
        } else {
            // A host terminal that is always connected and ready.
            MSR_DCD | MSR_DSR | MSR_CTS
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            DATA if self.dlab() => self.divisor.to_le_bytes()[0],
            DATA => self.rx.pop_front().unwrap_or(0),
            IER if self.dlab() => self.divisor.to_le_bytes()[1],
            IER => self.ier,
            IIR_FCR => self.read_iir(),
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => self.read_lsr(),
            MSR => self.read_msr(),
            SCR => self.scr,
            _ => 0xFF,
        }
    }

    fn transmit(&mut self, byte: u8) {
        if self.loopback() {
            if self.rx.len() < SERIAL_INPUT_CAPACITY {
                self.rx.push_back(byte);
            } else {
                self.overrun = true;
            }
        } else {
            match self.out.write_all(&[byte]).and_then(|()| self.out.flush()) {
                Ok(()) => self.bytes_written += 1,
                Err(e) if !self.write_error_logged => {
                    self.write_error_logged = true;
                    log::warn!("serial: dropping guest output, the console writer failed: {e}");
                }
                Err(_) => {}
            }
        }
        // The byte left THR at once: THR is empty again.
        self.thre_pending = true;
    }

    fn write_fcr(&mut self, value: u8) {
        if value & FCR_CLEAR_RX != 0 {
            self.rx.clear();
        }
        self.fcr = value & FCR_ENABLE;
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DATA if self.dlab() => self.divisor = (self.divisor & 0xFF00) | u16::from(value),
            DATA => self.transmit(value),
            IER if self.dlab() => {
                self.divisor = (self.divisor & 0x00FF) | (u16::from(value) << 8);
            }
            IER => {
                let enabling_thre = value & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = value & IER_MASK;
                if enabling_thre {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => self.write_fcr(value),
            LCR => self.lcr = value,
            MCR => self.mcr = value & MCR_MASK,
            SCR => self.scr = value,
            // LSR and MSR are read-only.
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            log::debug!("serial: ignoring {}-byte read at {offset:#x}", data.len());
            data.fill(0xFF);
            return;
        }
        data[0] = self.read_register(offset);
        self.update_irq();
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            log::debug!("serial: ignoring {}-byte write at {offset:#x}", data.len());
            return;
        }
        self.write_register(offset, data[0]);
        self.update_irq();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every level change of the line.
    #[derive(Default)]
    struct RecordingLine(Mutex<Vec<bool>>);
    impl IrqLine for RecordingLine {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }
    impl RecordingLine {
        fn changes(&self) -> Vec<bool> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// A writer whose bytes the test can inspect.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, SharedBuf, Arc<RecordingLine>) {
        let buf = SharedBuf::default();
        let line = Arc::new(RecordingLine::default());
        let irq: Arc<dyn IrqLine> = line.clone();
        (Serial::new(Box::new(buf.clone()), Some(irq)), buf, line)
    }

    fn rd(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(COM1_BASE, offset, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial, offset: u64, value: u8) {
        s.write(COM1_BASE, offset, &[value]);
    }

    #[test]
    fn thr_writes_reach_output_and_are_counted() {
        let (mut s, buf, _) = serial();
        for b in b"hi\n" {
            wr(&mut s, DATA, *b);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.bytes_written(), 3);
        assert_eq!(rd(&mut s, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn dlab_switches_data_and_ier_to_divisor_latch() {
        let (mut s, buf, _) = serial();
        wr(&mut s, LCR, 0x83);
        wr(&mut s, DATA, 0x01);
        wr(&mut s, IER, 0x02);
        assert_eq!(rd(&mut s, DATA), 0x01);
        assert_eq!(rd(&mut s, IER), 0x02);
        assert_eq!(s.divisor(), 0x0201);
        wr(&mut s, LCR, 0x03);
        assert_eq!(rd(&mut s, IER), 0, "IER untouched by divisor writes");
        assert!(buf.0.lock().unwrap().is_empty(), "DLL write is not output");
        assert_eq!(rd(&mut s, LCR), 0x03);
    }

    #[test]
    fn input_sets_data_ready_and_is_read_in_order() {
        let (mut s, _, _) = serial();
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, DATA), b'a');
        assert_eq!(rd(&mut s, DATA), b'b');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
    }

    #[test]
    fn input_queue_is_bounded() {
        let (mut s, _, _) = serial();
        let big = vec![7u8; SERIAL_INPUT_CAPACITY + 10];
        assert_eq!(s.enqueue_input(&big), SERIAL_INPUT_CAPACITY);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(b"x"), 0);
        rd(&mut s, DATA);
        assert_eq!(s.enqueue_input(b"xy"), 1);
    }

    #[test]
    fn loopback_routes_thr_to_rbr_and_mcr_to_msr() {
        let (mut s, buf, _) = serial();
        wr(&mut s, MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        assert_eq!(rd(&mut s, MSR) & 0xF0, 0x90, "Linux's 8250 loopback probe");
        wr(&mut s, MCR, MCR_LOOP | MCR_DTR | MCR_OUT1);
        assert_eq!(rd(&mut s, MSR) & 0xF0, MSR_DSR | MSR_RI);
        wr(&mut s, DATA, 0x5A);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, DATA), 0x5A);
        assert!(buf.0.lock().unwrap().is_empty());
        assert_eq!(s.bytes_written(), 0);
        wr(&mut s, MCR, MCR_OUT2);
        assert_eq!(rd(&mut s, MSR), MSR_DCD | MSR_DSR | MSR_CTS);
    }

    #[test]
    fn loopback_overflow_sets_and_read_clears_overrun() {
        let (mut s, _, line) = serial();
        wr(&mut s, MCR, MCR_LOOP);
        for _ in 0..=SERIAL_INPUT_CAPACITY {
            wr(&mut s, DATA, 1);
        }
        wr(&mut s, IER, IER_RLS);
        assert_eq!(line.changes(), vec![true]);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_RLS);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, LSR_OE);
        assert_eq!(line.changes(), vec![false]);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, 0);
    }

    #[test]
    fn rda_interrupt_follows_ier_and_fifo_contents() {
        let (mut s, _, line) = serial();
        s.enqueue_input(b"q");
        assert!(line.changes().is_empty(), "RDA not enabled in IER");
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
        wr(&mut s, IER, IER_RDA);
        assert_eq!(line.changes(), vec![true]);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_RDA);
        assert_eq!(rd(&mut s, DATA), b'q');
        assert_eq!(line.changes(), vec![false]);
        s.enqueue_input(b"r");
        assert_eq!(line.changes(), vec![true]);
        wr(&mut s, IER, 0);
        assert_eq!(line.changes(), vec![false]);
    }

    #[test]
    fn thre_interrupt_raised_on_enable_cleared_by_iir_read_and_rearmed_by_thr_write() {
        let (mut s, _, line) = serial();
        wr(&mut s, IER, IER_THRE);
        assert_eq!(line.changes(), vec![true]);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_THRE);
        assert_eq!(line.changes(), vec![false]);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
        wr(&mut s, DATA, b'x');
        assert_eq!(line.changes(), vec![true]);
        wr(&mut s, IER, 0);
        assert_eq!(line.changes(), vec![false]);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn rda_has_priority_over_thre_in_iir() {
        let (mut s, _, _) = serial();
        wr(&mut s, IER, IER_THRE | IER_RDA);
        s.enqueue_input(b"z");
        assert_eq!(rd(&mut s, IIR_FCR), IIR_RDA);
        rd(&mut s, DATA);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_THRE);
    }

    #[test]
    fn fifo_enable_shows_in_iir_and_clear_rx_empties_queue() {
        let (mut s, _, _) = serial();
        wr(&mut s, IIR_FCR, FCR_ENABLE);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        s.enqueue_input(b"abc");
        wr(&mut s, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        wr(&mut s, IIR_FCR, 0);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn linux_8250_autoconfig_detects_16550a() {
        let (mut s, _, _) = serial();
        // Scratch test through IER: only the 4 defined bits stick.
        wr(&mut s, IER, 0);
        assert_eq!(rd(&mut s, IER) & 0x0F, 0);
        wr(&mut s, IER, 0xFF);
        assert_eq!(rd(&mut s, IER), 0x0F, "no XScale UUE bit");
        wr(&mut s, IER, 0);
        // Scratch register.
        wr(&mut s, SCR, 0xA5);
        assert_eq!(rd(&mut s, SCR), 0xA5);
        // FIFO probe: IIR bits 7:6 == 3 means 16550A, bit 5 clear (no 64-byte FIFO).
        wr(&mut s, IIR_FCR, 0x21 | FCR_ENABLE);
        assert_eq!(rd(&mut s, IIR_FCR) >> 5, 0b110);
    }

    #[test]
    fn other_access_sizes_are_ignored() {
        let (mut s, buf, _) = serial();
        s.write(COM1_BASE, DATA, &[1, 2]);
        let mut w = [0u8; 2];
        s.read(COM1_BASE, LSR, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn failing_writer_does_not_count_bytes() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("gone"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut s = Serial::new(Box::new(Broken), None);
        wr(&mut s, DATA, b'a');
        wr(&mut s, DATA, b'b');
        assert_eq!(s.bytes_written(), 0);
        assert_eq!(rd(&mut s, LSR) & LSR_THRE, LSR_THRE);
    }
}
