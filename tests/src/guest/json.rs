//! The flat JSON object of the guest's result line: a tiny parser (no serde) for string keys and
//! string, number, boolean or null values.

use std::collections::BTreeMap;
use std::fmt::{self, Display};

use super::GuestError;

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
