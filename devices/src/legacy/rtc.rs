//! MC146818 CMOS real-time clock at ports 0x70 (index) / 0x71 (data).
//!
//! The time and date registers show the host's wall-clock time (UTC, from an
//! injectable [`WallClock`]) plus an offset that the guest moves by setting
//! the clock. Register B selects BCD or binary (DM, bit 2) and 12 or 24 hour
//! (bit 1) encoding; setting its SET bit (7) freezes a copy of the time that
//! the guest edits and that becomes the new time when SET is cleared, as on
//! the real chip. Register A never reports an update in progress, register C
//! never reports an interrupt (the device raises none) and register D reports
//! a valid battery. Every other index of the 128 is plain RAM, alarm bytes
//! included. Bit 7 of the index (NMI disable) is ignored; port 0x70 is
//! write-only and reads as ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port; the data port follows it.
pub const RTC_PORT: u64 = 0x70;
/// Number of ports the device claims (index and data).
pub const RTC_PORT_LEN: u64 = 2;
/// CMOS byte that holds the century, announced to Linux in the FADT's CENTURY field.
pub const RTC_CENTURY_INDEX: u8 = 0x32;

const CMOS_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// Register A: 32.768 kHz time base (divider 010), 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_DM_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
/// Register B after power-on as firmware leaves it: 24-hour, BCD.
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register D: valid RAM and time (battery good).
const REG_D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// Source of the current wall-clock time.
pub trait WallClock: Send {
    /// Time since the Unix epoch, UTC.
    fn now(&self) -> Duration;
}

/// The host's `CLOCK_REALTIME` (vDSO, no system call in the common case).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A broken-down UTC date and time. Fields may be out of range while the
/// guest edits a frozen copy; [`DateTime::to_unix`] validates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2024.
    pub year: i64,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
}

impl DateTime {
    /// Breaks down seconds since the Unix epoch (proleptic Gregorian calendar).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// Seconds since the Unix epoch, or `None` if a field is out of range.
    pub fn to_unix(&self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && (0..=9999).contains(&self.year)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }

    /// Day of the week as the RTC counts it: 1 = Sunday .. 7 = Saturday.
    fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday (5 in RTC numbering).
        let days = days_from_civil(self.year, self.month, self.day);
        ((days + 4).rem_euclid(7) + 1) as u8
    }
}

fn is_leap(year: i64) -> bool {
    (year.rem_euclid(4) == 0 && year.rem_euclid(100) != 0) || year.rem_euclid(400) == 0
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(v: u8) -> u8 {
    let v = v % 100;
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The CMOS RTC.
pub struct Rtc {
    clock: Box<dyn WallClock>,
    /// Seconds added to the host clock (moved when the guest sets the time).
    offset: i64,
    /// The time being edited while register B's SET bit is on.
    frozen: Option<DateTime>,
    index: u8,
    ram: [u8; CMOS_SIZE],
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("offset", &self.offset)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new(Box::new(SystemClock))
    }
}

impl Rtc {
    /// Creates the RTC reading time from `clock`.
    pub fn new(clock: Box<dyn WallClock>) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[REG_A as usize] = REG_A_DEFAULT;
        ram[REG_B as usize] = REG_B_DEFAULT;
        Self {
            clock,
            offset: 0,
            frozen: None,
            index: 0,
            ram,
        }
    }

    /// The time the guest sees.
    pub fn now(&self) -> DateTime {
        if let Some(t) = self.frozen {
            return t;
        }
        let host = i64::try_from(self.clock.now().as_secs()).unwrap_or(i64::MAX);
        DateTime::from_unix(host.saturating_add(self.offset))
    }

    fn reg_b(&self) -> u8 {
        self.ram[REG_B as usize]
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_DM_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.decode(v);
        }
        let pm = if v & HOUR_PM != 0 { 12 } else { 0 };
        self.decode(v & !HOUR_PM) % 12 + pm
    }

    fn read_register(&self, index: u8) -> u8 {
        let t = || self.now();
        match index {
            REG_SECONDS => self.encode(t().second),
            REG_MINUTES => self.encode(t().minute),
            REG_HOURS => self.encode_hour(t().hour),
            REG_WEEKDAY => self.encode(t().weekday()),
            REG_DAY => self.encode(t().day),
            REG_MONTH => self.encode(t().month),
            REG_YEAR => self.encode((t().year.rem_euclid(100)) as u8),
            RTC_CENTURY_INDEX => self.encode((t().year.rem_euclid(10_000) / 100) as u8),
            REG_A => self.ram[REG_A as usize] & !REG_A_UIP,
            REG_C => 0,
            REG_D => REG_D_VRT,
            _ => self.ram[usize::from(index & INDEX_MASK)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | RTC_CENTURY_INDEX => self.write_time(index, value),
            // The weekday follows from the date.
            REG_WEEKDAY => {}
            REG_A => self.ram[REG_A as usize] = value & !REG_A_UIP,
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => {}
            _ => self.ram[usize::from(index & INDEX_MASK)] = value,
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let was_set = self.reg_b() & REG_B_SET != 0;
        let set = value & REG_B_SET != 0;
        if set && !was_set {
            self.frozen = Some(self.now());
        }
        self.ram[REG_B as usize] = value;
        if was_set && !set {
            if let Some(t) = self.frozen.take() {
                self.commit(t);
            }
        }
    }

    fn write_time(&mut self, index: u8, value: u8) {
        let mut t = self.now();
        let v = self.decode(value);
        match index {
            REG_SECONDS => t.second = v,
            REG_MINUTES => t.minute = v,
            REG_HOURS => t.hour = self.decode_hour(value),
            REG_DAY => t.day = v,
            REG_MONTH => t.month = v,
            REG_YEAR => t.year = t.year - t.year.rem_euclid(100) + i64::from(v),
            _ => t.year = i64::from(v) * 100 + t.year.rem_euclid(100),
        }
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.commit(t);
        }
    }

    /// Makes `t` the current time, unless it is not a valid date.
    fn commit(&mut self, t: DateTime) {
        let Some(secs) = t.to_unix() else {
            log::debug!("rtc: ignoring invalid time {t:?}");
            return;
        };
        let host = i64::try_from(self.clock.now().as_secs()).unwrap_or(i64::MAX);
        self.offset = secs.saturating_sub(host);
    }

    fn read_port(&self, port: u64) -> u8 {
        match port {
            1 => self.read_register(self.index),
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u64, value: u8) {
        match port {
            0 => self.index = value & INDEX_MASK,
            1 => self.write_register(self.index, value),
            _ => log::debug!("rtc: ignoring write at port offset {port:#x}"),
        }
    }
}

impl BusDevice for Rtc {
    /// Each byte of a wide access goes to its own port, as on the ISA bus.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_port(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write_port(offset.saturating_add(i as u64), *b);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_214_307;

    #[derive(Clone)]
    struct FakeClock(Arc<AtomicU64>);

    impl WallClock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_secs(self.0.load(Ordering::SeqCst))
        }
    }

    fn rtc_at(secs: u64) -> (Rtc, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(secs));
        (Rtc::new(Box::new(FakeClock(t.clone()))), t)
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(RTC_PORT, 0, &[index]);
        let mut b = [0u8];
        rtc.read(RTC_PORT, 1, &mut b);
        b[0]
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(RTC_PORT, 0, &[index]);
        rtc.write(RTC_PORT, 1, &[value]);
    }

    fn time_regs(rtc: &mut Rtc) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| read(rtc, i))
    }

    #[test]
    fn date_of_a_fixed_timestamp_in_bcd() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        // sec, min, hour, weekday (Thursday = 5), day, month, year, century.
        assert_eq!(
            time_regs(&mut rtc),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn binary_mode_and_12_hour_mode() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_DM_BINARY);
        assert_eq!(time_regs(&mut rtc), [7, 45, 13, 5, 29, 2, 24, 20]);
        write(&mut rtc, REG_B, REG_B_DM_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 1);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 0x01);
        // Midnight and noon in 12-hour mode.
        let (mut rtc, _) = rtc_at(LEAP_DAY - 13 * 3600);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x12);
        let (mut rtc, _) = rtc_at(LEAP_DAY - 3600);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 0x12);
    }

    #[test]
    fn status_registers_a_to_d() {
        let (mut rtc, _) = rtc_at(0);
        assert_eq!(read(&mut rtc, REG_A), 0x26);
        assert_eq!(read(&mut rtc, REG_B), REG_B_24H);
        assert_eq!(read(&mut rtc, REG_C), 0);
        assert_eq!(read(&mut rtc, REG_D), 0x80);
        // UIP is read-only, C and D ignore writes.
        write(&mut rtc, REG_A, 0xa6);
        write(&mut rtc, REG_C, 0xff);
        write(&mut rtc, REG_D, 0);
        assert_eq!(
            [REG_A, REG_C, REG_D].map(|i| read(&mut rtc, i)),
            [0x26, 0, 0x80]
        );
        // The epoch itself: 1970-01-01 00:00:00, a Thursday.
        assert_eq!(time_regs(&mut rtc), [0, 0, 0, 0x05, 0x01, 0x01, 0x70, 0x19]);
    }

    #[test]
    fn index_masks_nmi_bit_and_port_0x70_reads_ones() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        write(&mut rtc, 0x40, 0x5a);
        // 0xC0 = NMI disable | 0x40.
        assert_eq!(read(&mut rtc, 0xc0), 0x5a);
        // 0x80 wraps to index 0 (seconds).
        assert_eq!(read(&mut rtc, 0x80), 0x07);
        let mut b = [0u8];
        rtc.read(RTC_PORT, 0, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn ram_bytes_round_trip_and_odd_accesses_are_bounded() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        let ram: Vec<u8> = (0x0e..0x80).filter(|&i| i != RTC_CENTURY_INDEX).collect();
        for &i in &ram {
            write(&mut rtc, i, i ^ 0xa5);
        }
        for &i in &ram {
            assert_eq!(read(&mut rtc, i), i ^ 0xa5, "index {i:#x}");
        }
        // Alarm bytes are RAM too.
        write(&mut rtc, 0x01, 0x33);
        assert_eq!(read(&mut rtc, 0x01), 0x33);
        // Out-of-range port offsets are ignored; a word write sets index then data.
        rtc.write(RTC_PORT, 2, &[1]);
        rtc.write(RTC_PORT, u64::MAX, &[1, 2]);
        let mut b = [0u8; 4];
        rtc.read(RTC_PORT, 5, &mut b);
        assert_eq!(b, [0xff; 4]);
        rtc.write(RTC_PORT, 0, &[0x20, 0x77]);
        assert_eq!(read(&mut rtc, 0x20), 0x77);
        let mut w = [0u8; 2];
        rtc.write(RTC_PORT, 0, &[0x20]);
        rtc.read(RTC_PORT, 0, &mut w);
        assert_eq!(w, [0xff, 0x77]);
    }

    #[test]
    fn time_follows_the_host_clock() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        clock.fetch_add(60 * 60 * 24 + 53, Ordering::SeqCst);
        // 2024-03-01 13:46:00, a Friday.
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x46, 0x13, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn guest_sets_the_time_under_the_set_bit() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        write(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        // Intermediate invalid date (31 February) is fine while frozen.
        for (i, v) in [(0x09, 0x99), (0x32, 0x19), (0x07, 0x31), (0x08, 0x12)] {
            write(&mut rtc, i, v);
        }
        for (i, v) in [(0x04, 0x23), (0x02, 0x59), (0x00, 0x58)] {
            write(&mut rtc, i, v);
        }
        clock.fetch_add(100, Ordering::SeqCst);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x58, "frozen while SET");
        write(&mut rtc, REG_B, REG_B_24H);
        clock.fetch_add(3, Ordering::SeqCst);
        // 1999-12-31 23:59:58 + 3 s = 2000-01-01 00:00:01, a Saturday.
        assert_eq!(
            time_regs(&mut rtc),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn hostile_time_writes_never_panic_and_invalid_dates_are_ignored() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        for b in [0u8, REG_B_DM_BINARY, REG_B_24H, REG_B_24H | REG_B_DM_BINARY] {
            write(&mut rtc, REG_B, b);
            for i in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
                for v in [0x00, 0x7f, 0x80, 0x99, 0xff] {
                    write(&mut rtc, i, v);
                    let _ = time_regs(&mut rtc);
                }
            }
        }
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        write(&mut rtc, REG_MONTH, 0x13);
        write(&mut rtc, REG_SECONDS, 0x60);
        write(&mut rtc, REG_DAY, 0x30); // 30 February
        assert_eq!(read(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read(&mut rtc, REG_DAY), 0x29);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x07);
        // A clock far beyond year 9999 still encodes without panicking.
        let (mut rtc, _) = rtc_at(u64::MAX);
        let _ = time_regs(&mut rtc);
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for secs in [0, 951_782_400, LEAP_DAY as i64, 4_102_444_800, -86_400] {
            let t = DateTime::from_unix(secs);
            assert_eq!(t.to_unix(), Some(secs).filter(|_| t.year >= 0));
        }
        assert_eq!(
            DateTime::from_unix(951_782_400),
            DateTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        assert!(DateTime::from_unix(0).to_unix().is_some());
        let bad = DateTime {
            month: 2,
            day: 29,
            ..DateTime::from_unix(4_102_444_800) // 2100 is not a leap year
        };
        assert_eq!(bad.to_unix(), None);
    }
}
