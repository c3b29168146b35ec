//! The fast test guest (`tests/guest`): where its ELF is, how to tell it what to run, and how to
//! read the one `IOVMM-RESULT {...}` line it prints before exiting through the exit port.
//!
//! The guest is built by `tests/build.rs` with the system gcc. Its ring-0 part only sets up
//! descriptor tables and page tables, then the scenario runs in ring 3 (native speed under
//! kvm-pvm). The scenario comes from the kernel command line, e.g.
//! `iovmm.test=net-tx iovmm.frames=1000 iovmm.size=1500`, which [`Scenario`] builds.

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::path::Path;

/// Exit code of a scenario that passed.
pub const EXIT_OK: i32 = 0;
/// Exit code of a scenario that ran and found a failure (timeout, wrong data, device error).
pub const EXIT_FAILED: i32 = 1;
/// Exit code for a missing or malformed `iovmm.*` parameter.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the scenario needs a device or feature that is absent or not implemented.
pub const EXIT_UNSUPPORTED: i32 = 3;
/// A CPU exception ends the guest with this code plus the vector.
pub const EXIT_EXCEPTION_BASE: i32 = 0x40;
/// The page-fault vector (the `fault` scenario triggers one from ring 3).
pub const PAGE_FAULT_VECTOR: u8 = 14;
/// The prefix of the guest's result line on the serial console.
pub const RESULT_PREFIX: &str = "IOVMM-RESULT ";
/// Longest command line the guest reads (bytes, without the NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;

/// The guest's exit code when CPU exception `vector` ended it.
pub const fn exception_exit_code(vector: u8) -> i32 {
    EXIT_EXCEPTION_BASE + (vector & 0x1f) as i32
}

/// Path of the test guest ELF built for this test binary.
pub fn test_guest_path() -> &'static Path {
    Path::new(env!("IOVMM_TEST_GUEST"))
}

/// Errors of the guest helpers: building a command line or reading a result line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuestError {
    /// A scenario name or parameter would not survive the whitespace-split command line.
    #[error("invalid guest parameter {key:?}={value:?}: keys and values must be non-empty, without whitespace, and keys without '='")]
    InvalidParam {
        /// The parameter key (without the `iovmm.` prefix).
        key: String,
        /// Its value.
        value: String,
    },
    /// The command line would be cut by the guest.
    #[error("guest command line is {len} bytes, the guest reads at most {MAX_CMDLINE_LEN}; drop parameters")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The output has no result line: the guest died before reporting, or the output is truncated.
    #[error("no `IOVMM-RESULT` line in the guest output; check the serial log for IOVMM-EXCEPTION or a VMM error")]
    NoResultLine,
    /// The guest printed more than one result line (it prints exactly one).
    #[error("{count} `IOVMM-RESULT` lines in the guest output, expected exactly one")]
    MultipleResultLines {
        /// How many were found.
        count: usize,
    },
    /// The result line is not a flat JSON object.
    #[error("malformed result JSON at byte {offset}: {what}")]
    Syntax {
        /// Byte offset into the JSON text.
        offset: usize,
        /// What was wrong or expected there.
        what: &'static str,
    },
    /// A key appears twice in the result object.
    #[error("duplicate key {0:?} in the result JSON")]
    DuplicateKey(String),
}

/// The IOMMU mode the guest's DMA layer uses (like Linux's `iommu.passthrough` / `iommu.strict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuMode {
    /// No vIOMMU programming; device addresses are guest physical addresses.
    Off,
    /// The device's domain is identity-mapped / bypassed.
    Passthrough,
    /// Map and unmap (with synchronous invalidation) around every buffer.
    Strict,
    /// Map every buffer, batch the unmaps and flush periodically.
    Lazy,
}

impl IommuMode {
    /// The value of `iovmm.iommu=`.
    pub fn as_str(self) -> &'static str {
        match self {
            IommuMode::Off => "off",
            IommuMode::Passthrough => "passthrough",
            IommuMode::Strict => "strict",
            IommuMode::Lazy => "lazy",
        }
    }
}

/// A guest scenario and its `iovmm.*` parameters; [`Scenario::cmdline`] renders the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    test: String,
    params: Vec<(String, String)>,
}

impl Scenario {
    /// A scenario by name (`hello`, `fault`, `tsc`, `pci-scan`, `net-tx`, ...).
    pub fn new(test: impl Into<String>) -> Self {
        Scenario {
            test: test.into(),
            params: Vec::new(),
        }
    }

    /// Prints `IOVMM-TEST hello ok` and exits 0.
    pub fn hello() -> Self {
        Self::new("hello")
    }

    /// Page-faults in ring 3; the guest exits with `exception_exit_code(PAGE_FAULT_VECTOR)`.
    pub fn fault() -> Self {
        Self::new("fault")
    }

    /// Times a 10M-iteration loop with RDTSC (`iterations` overrides the count).
    pub fn tsc() -> Self {
        Self::new("tsc")
    }

    /// Lists the functions on PCI bus 0 with their BARs.
    pub fn pci_scan() -> Self {
        Self::new("pci-scan")
    }

    /// Transmits `frames` frames of `size` bytes on the first virtio-net device.
    pub fn net_tx(frames: u64, size: u64) -> Self {
        Self::new("net-tx").frames(frames).size(size)
    }

    /// The scenario name.
    pub fn test(&self) -> &str {
        &self.test
    }

    /// Sets `iovmm.<key>=<value>`, replacing an earlier value of the same key.
    pub fn param(mut self, key: &str, value: impl Display) -> Self {
        let value = value.to_string();
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
        self
    }

    /// Number of frames (`iovmm.frames`).
    pub fn frames(self, n: u64) -> Self {
        self.param("frames", n)
    }

    /// Frame size in bytes without the virtio-net header (`iovmm.size`, 60..65000).
    pub fn size(self, bytes: u64) -> Self {
        self.param("size", bytes)
    }

    /// Frames added to the ring per notification (`iovmm.batch`).
    pub fn batch(self, n: u64) -> Self {
        self.param("batch", n)
    }

    /// Upper bound of the transmit queue size (`iovmm.queue`).
    pub fn queue_size(self, n: u64) -> Self {
        self.param("queue", n)
    }

    /// How long the guest waits for progress before reporting a timeout (`iovmm.timeout_ms`).
    pub fn timeout_ms(self, ms: u64) -> Self {
        self.param("timeout_ms", ms)
    }

    /// The host TSC rate, so the guest can turn timeouts into cycles and report it
    /// (`iovmm.tsc_khz`; CPUID does not tell it on AMD hosts).
    pub fn tsc_khz(self, khz: u64) -> Self {
        self.param("tsc_khz", khz)
    }

    /// The DMA layer's IOMMU mode (`iovmm.iommu`).
    pub fn iommu(self, mode: IommuMode) -> Self {
        self.param("iommu", mode.as_str())
    }

    /// The kernel command line: `iovmm.test=<name>` followed by the parameters in the order set.
    pub fn cmdline(&self) -> Result<String, GuestError> {
        check_param("test", &self.test)?;
        let mut line = format!("iovmm.test={}", self.test);
        for (key, value) in &self.params {
            check_param(key, value)?;
            line.push_str(&format!(" iovmm.{key}={value}"));
        }
        if line.len() > MAX_CMDLINE_LEN {
            return Err(GuestError::CmdlineTooLong { len: line.len() });
        }
        Ok(line)
    }
}

fn check_param(key: &str, value: &str) -> Result<(), GuestError> {
    let bad = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad(key) || bad(value) || key.contains('=') {
        return Err(GuestError::InvalidParam {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(())
}

/// A value of the flat result object.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue {
    /// A JSON string (escapes decoded).
    String(String),
    /// A JSON number without fraction or exponent.
    Integer(i128),
    /// Any other JSON number.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

impl Display for JsonValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonValue::String(s) => write!(f, "{s:?}"),
            JsonValue::Integer(n) => write!(f, "{n}"),
            JsonValue::Float(x) => write!(f, "{x}"),
            JsonValue::Bool(b) => write!(f, "{b}"),
            JsonValue::Null => f.write_str("null"),
        }
    }
}

/// The guest's `IOVMM-RESULT` line as a key/value map.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestResult {
    fields: BTreeMap<String, JsonValue>,
}

impl GuestResult {
    /// Finds the single result line in the guest's serial output and parses it.
    pub fn from_output(output: &str) -> Result<Self, GuestError> {
        let lines: Vec<&str> = output
            .lines()
            .filter_map(|l| l.find(RESULT_PREFIX).map(|i| &l[i..]))
            .collect();
        match lines.as_slice() {
            [] => Err(GuestError::NoResultLine),
            [line] => Self::parse_line(line),
            _ => Err(GuestError::MultipleResultLines { count: lines.len() }),
        }
    }

    /// Parses one line `IOVMM-RESULT {...}` (text before the prefix is ignored).
    pub fn parse_line(line: &str) -> Result<Self, GuestError> {
        let start = line.find(RESULT_PREFIX).ok_or(GuestError::NoResultLine)?;
        let json = line[start + RESULT_PREFIX.len()..].trim_end_matches(['\r', '\n']);
        Ok(GuestResult {
            fields: parse_flat_json(json)?,
        })
    }

    /// All fields.
    pub fn fields(&self) -> &BTreeMap<String, JsonValue> {
        &self.fields
    }

    /// One field.
    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        self.fields.get(key)
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.fields.get(key) {
            Some(JsonValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer field that fits in u64; hex strings such as `"0x1f"` are accepted too.
    pub fn u64(&self, key: &str) -> Option<u64> {
        match self.fields.get(key)? {
            JsonValue::Integer(n) => u64::try_from(*n).ok(),
            JsonValue::String(s) => u64::from_str_radix(s.strip_prefix("0x")?, 16).ok(),
            _ => None,
        }
    }

    /// The scenario name (`test`).
    pub fn test(&self) -> Option<&str> {
        self.str("test")
    }

    /// `ok`, `failed`, `error`, `unsupported`, `exception` or `timeout`.
    pub fn status(&self) -> Option<&str> {
        self.str("status")
    }

    /// Whether the status is `ok`.
    pub fn is_ok(&self) -> bool {
        self.status() == Some("ok")
    }
}

/// Parses a flat JSON object (string keys; string, number, boolean or null values).
pub fn parse_flat_json(text: &str) -> Result<BTreeMap<String, JsonValue>, GuestError> {
    let mut p = Parser {
        text: text.as_bytes(),
        pos: 0,
    };
    let mut fields = BTreeMap::new();
    p.skip_ws();
    p.expect(b'{', "expected '{'")?;
    p.skip_ws();
    if p.peek() == Some(b'}') {
        p.pos += 1;
    } else {
        loop {
            p.skip_ws();
            let key = p.string()?;
            p.skip_ws();
            p.expect(b':', "expected ':' after a key")?;
            p.skip_ws();
            let value = p.value()?;
            if fields.insert(key.clone(), value).is_some() {
                return Err(GuestError::DuplicateKey(key));
            }
            p.skip_ws();
            match p.bump() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(p.error_before("expected ',' or '}'")),
            }
        }
    }
    p.skip_ws();
    if p.pos != p.text.len() {
        return Err(p.error("trailing characters after the object"));
    }
    Ok(fields)
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &'static str) -> GuestError {
        GuestError::Syntax {
            offset: self.pos,
            what,
        }
    }

    fn error_before(&self, what: &'static str) -> GuestError {
        GuestError::Syntax {
            offset: self.pos.saturating_sub(1),
            what,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), GuestError> {
        if self.peek() != Some(c) {
            return Err(self.error(what));
        }
        self.pos += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, value: JsonValue) -> Result<JsonValue, GuestError> {
        if !self.text[self.pos..].starts_with(word.as_bytes()) {
            return Err(self.error("unknown literal (expected true, false or null)"));
        }
        self.pos += word.len();
        Ok(value)
    }

    fn value(&mut self) -> Result<JsonValue, GuestError> {
        match self.peek() {
            Some(b'"') => Ok(JsonValue::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", JsonValue::Bool(true)),
            Some(b'f') => self.literal("false", JsonValue::Bool(false)),
            Some(b'n') => self.literal("null", JsonValue::Null),
            Some(b'{' | b'[') => {
                Err(self.error("nested objects and arrays are not allowed in a flat result"))
            }
            _ => Err(self.error("expected a value")),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<JsonValue, GuestError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let n = self.digits();
        if n == 0 || (n > 1 && self.text[int_start] == b'0') {
            return Err(self.error("malformed number (no digits, or a leading zero)"));
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            integer = false;
            if self.digits() == 0 {
                return Err(self.error("expected digits after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            integer = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("expected digits in the exponent"));
            }
        }
        // The slice holds only ASCII digits, signs, '.' and 'e'.
        let text = std::str::from_utf8(&self.text[start..self.pos])
            .map_err(|_| self.error("non-ASCII number"))?;
        if integer {
            let n = text.parse().map_err(|_| GuestError::Syntax {
                offset: start,
                what: "integer out of range",
            })?;
            Ok(JsonValue::Integer(n))
        } else {
            let x = text.parse().map_err(|_| GuestError::Syntax {
                offset: start,
                what: "malformed number",
            })?;
            Ok(JsonValue::Float(x))
        }
    }

    fn hex4(&mut self) -> Result<u32, GuestError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .ok_or(self.error("truncated \\u escape"))?;
        let s = std::str::from_utf8(digits).map_err(|_| self.error("bad \\u escape"))?;
        let v = u32::from_str_radix(s, 16).map_err(|_| self.error("bad \\u escape"))?;
        self.pos += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, GuestError> {
        let hi = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&hi) {
            if self.bump() != Some(b'\\') || self.bump() != Some(b'u') {
                return Err(
                    self.error_before("a high surrogate must be followed by a \\u low surrogate")
                );
            }
            let lo = self.hex4()?;
            if !(0xdc00..0xe000).contains(&lo) {
                return Err(self.error("expected a low surrogate"));
            }
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else {
            hi
        };
        char::from_u32(code).ok_or(self.error("\\u escape is not a character (lone low surrogate)"))
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), GuestError> {
        let c = match self.bump() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => self.unicode_escape()?,
            _ => return Err(self.error_before("unknown escape")),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        Ok(())
    }

    fn string(&mut self) -> Result<String, GuestError> {
        self.expect(b'"', "expected a string")?;
        let mut out = Vec::new();
        loop {
            match self.bump() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => self.escape(&mut out)?,
                Some(c) if c < 0x20 => {
                    return Err(self.error_before("raw control character in a string"))
                }
                Some(c) => out.push(c),
            }
        }
        // The input was a &str and escapes add whole characters, so this cannot fail.
        String::from_utf8(out).map_err(|_| self.error("invalid UTF-8 in a string"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn le_u64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn guest_elf_is_x86_64_entered_at_2_mib_with_identity_loaded_segments() {
        let bytes = std::fs::read(test_guest_path()).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 62, "EM_X86_64");
        assert_eq!(le_u64(&bytes, 24), 0x20_0000, "entry");
        let phoff = le_u64(&bytes, 32) as usize;
        let phentsize = u16::from_le_bytes([bytes[54], bytes[55]]) as usize;
        let phnum = u16::from_le_bytes([bytes[56], bytes[57]]) as usize;
        let loads: Vec<(u64, u64, u64)> = (0..phnum)
            .map(|i| &bytes[phoff + i * phentsize..])
            .filter(|ph| u32::from_le_bytes(ph[..4].try_into().unwrap()) == 1)
            .map(|ph| (le_u64(ph, 16), le_u64(ph, 24), le_u64(ph, 40)))
            .collect();
        assert!(!loads.is_empty());
        for (vaddr, paddr, memsz) in loads {
            assert_eq!(vaddr, paddr, "vaddr = paddr");
            assert!(
                paddr >= 0x20_0000 && paddr + memsz <= 0x100_0000,
                "segment at {paddr:#x}"
            );
        }
    }

    #[test]
    fn guest_code_has_no_sse_avx_x87_or_emulator_hostile_instructions() {
        let out = std::process::Command::new("objdump")
            .arg("-d")
            .arg(test_guest_path())
            .output()
            .expect("objdump (binutils, see resources/install-deps.sh)");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("<_start>:") || text.contains("<__image_start>:"));
        for bad in [
            "%xmm",
            "%ymm",
            "%zmm",
            "%st",
            "int3",
            "xsave",
            "xrstor",
            "cmpxchg16b",
        ] {
            assert!(!text.contains(bad), "the guest contains {bad}");
        }
    }

    #[test]
    fn cmdline_starts_with_test_and_keeps_parameter_order() {
        let s = Scenario::net_tx(1000, 1500)
            .iommu(IommuMode::Strict)
            .batch(8);
        assert_eq!(
            s.cmdline().unwrap(),
            "iovmm.test=net-tx iovmm.frames=1000 iovmm.size=1500 iovmm.iommu=strict iovmm.batch=8"
        );
        assert_eq!(Scenario::hello().cmdline().unwrap(), "iovmm.test=hello");
    }

    #[test]
    fn setting_a_parameter_twice_keeps_the_last_value() {
        let s = Scenario::net_tx(1, 60).frames(5);
        assert_eq!(
            s.cmdline().unwrap(),
            "iovmm.test=net-tx iovmm.frames=5 iovmm.size=60"
        );
    }

    #[test]
    fn cmdline_rejects_whitespace_and_empty_parts() {
        assert!(matches!(
            Scenario::new("a b").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k", "x y").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k=v", 1).cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
        assert!(matches!(
            Scenario::hello().param("k", "").cmdline(),
            Err(GuestError::InvalidParam { .. })
        ));
    }

    #[test]
    fn cmdline_longer_than_the_guest_buffer_is_rejected() {
        let s = Scenario::hello().param("blob", "x".repeat(MAX_CMDLINE_LEN));
        assert!(matches!(
            s.cmdline(),
            Err(GuestError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn exception_exit_code_adds_the_vector() {
        assert_eq!(exception_exit_code(PAGE_FAULT_VECTOR), 0x4e);
        assert_eq!(exception_exit_code(0), EXIT_EXCEPTION_BASE);
    }

    #[test]
    fn result_line_is_found_among_serial_output() {
        let out = "boot\r\nIOVMM-TEST hello ok\r\nIOVMM-RESULT {\"test\":\"hello\",\"status\":\"ok\",\"ring0_cycles\":1234}\r\n";
        let r = GuestResult::from_output(out).unwrap();
        assert_eq!(r.test(), Some("hello"));
        assert!(r.is_ok());
        assert_eq!(r.u64("ring0_cycles"), Some(1234));
        assert_eq!(r.fields().len(), 3);
    }

    #[test]
    fn missing_or_repeated_result_lines_are_errors() {
        assert_eq!(
            GuestResult::from_output("IOVMM-TEST hello ok\n"),
            Err(GuestError::NoResultLine)
        );
        let twice = "IOVMM-RESULT {}\nIOVMM-RESULT {}\n";
        assert_eq!(
            GuestResult::from_output(twice),
            Err(GuestError::MultipleResultLines { count: 2 })
        );
    }

    #[test]
    fn exception_result_carries_hex_strings() {
        let line = r#"IOVMM-RESULT {"test":"fault","status":"exception","vector":14,"error":6,"rip":"0x2003a1","cr2":"0x8000000000"}"#;
        let r = GuestResult::parse_line(line).unwrap();
        assert_eq!(r.status(), Some("exception"));
        assert!(!r.is_ok());
        assert_eq!(r.u64("vector"), Some(14));
        assert_eq!(r.u64("cr2"), Some(0x80_0000_0000));
        assert_eq!(r.str("vector"), None);
    }

    #[test]
    fn flat_json_decodes_all_value_kinds() {
        let m = parse_flat_json(r#" { "s" : "a\"b\\c\n\u00e9\ud83d\ude00", "i":-12, "big":18446744073709551615, "f":1.5e3, "t":true, "n":null } "#)
            .unwrap();
        assert_eq!(m["s"], JsonValue::String("a\"b\\c\né😀".to_string()));
        assert_eq!(m["i"], JsonValue::Integer(-12));
        assert_eq!(m["big"], JsonValue::Integer(u64::MAX as i128));
        assert_eq!(m["f"], JsonValue::Float(1500.0));
        assert_eq!(m["t"], JsonValue::Bool(true));
        assert_eq!(m["n"], JsonValue::Null);
        assert!(parse_flat_json("{}").unwrap().is_empty());
    }

    #[test]
    fn flat_json_rejects_nesting_duplicates_and_trailing_text() {
        assert!(matches!(
            parse_flat_json(r#"{"a":{"b":1}}"#),
            Err(GuestError::Syntax { offset: 5, .. })
        ));
        assert!(matches!(
            parse_flat_json(r#"{"a":[1]}"#),
            Err(GuestError::Syntax { .. })
        ));
        assert_eq!(
            parse_flat_json(r#"{"a":1,"a":2}"#),
            Err(GuestError::DuplicateKey("a".into()))
        );
        assert!(matches!(
            parse_flat_json(r#"{"a":1} x"#),
            Err(GuestError::Syntax { offset: 8, .. })
        ));
    }

    #[test]
    fn flat_json_rejects_malformed_tokens() {
        for bad in [
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":tru}"#,
            r#"{"a":"x}"#,
            r#"{"a":"\q"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":1"#,
            r#"{"a":999999999999999999999999999999999999999999}"#,
            "",
        ] {
            assert!(
                matches!(parse_flat_json(bad), Err(GuestError::Syntax { .. })),
                "accepted {bad:?}"
            );
        }
    }
}
