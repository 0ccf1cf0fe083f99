//! Python-compatible JSON writer: produces byte-for-byte what CPython's `json.dumps(obj)` produces with
//! default arguments (`", "` / `": "` separators, `ensure_ascii=True`, no indentation, no trailing
//! newline), which the predecessor used for every cache file and for the JSON strings stored in
//! Parquet cells (`predecessor-data-format.md` §1.3, §3.2, §6 Q7).
//!
//! Escaping rules of `ensure_ascii=True` (CPython `py_encode_basestring_ascii`):
//! * `"` → `\"`, `\` → `\\`, and the short escapes `\n \r \t \b \f`;
//! * every other char outside `0x20..=0x7E` → `\uXXXX` with lowercase hex (so DEL is `\u007f`);
//! * chars above U+FFFF → a UTF-16 surrogate pair (`😀` → `\ud83d\ude00`);
//! * `/` is **not** escaped.
//!
//! Two APIs:
//! * [`PyJsonWriter`], an ordered builder for objects whose key order is fixed by the format (the
//!   consolidated post, the embed object, likes, follows). It appends to one `String` and never
//!   allocates anything else.
//! * [`to_py_json`] / [`write_py_value`] for arbitrary [`serde_json::Value`]s (object keys in the
//!   map's iteration order, which is sorted because `serde_json` is built without
//!   `preserve_order`).

use serde_json::Value;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `\uXXXX` (lowercase hex) for one UTF-16 code unit.
#[inline]
fn push_u_escape(out: &mut String, unit: u16) {
    out.push('\\');
    out.push('u');
    for shift in [12u16, 8, 4, 0] {
        out.push(char::from(HEX[usize::from((unit >> shift) & 0xf)]));
    }
}

/// True for the bytes that Python writes verbatim: printable ASCII except `"` and `\`.
#[inline]
fn is_plain(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

/// Appends `s` as a Python `json.dumps` string literal (quotes included, `ensure_ascii=True`).
pub fn write_py_str(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push('"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            i += 1;
            continue;
        }
        out.push_str(&s[start..i]);
        if b < 0x80 {
            match b {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                0x08 => out.push_str("\\b"),
                0x0c => out.push_str("\\f"),
                _ => push_u_escape(out, u16::from(b)),
            }
            i += 1;
        } else {
            // `i` is always on a char boundary: we only ever advance by one ASCII byte or one char.
            let Some(c) = s[i..].chars().next() else {
                break;
            };
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                push_u_escape(out, *unit);
            }
            i += c.len_utf8();
        }
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Returns `s` as a Python `json.dumps` string literal (quotes included).
pub fn py_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_py_str(&mut out, s);
    out
}

/// Appends a float exactly as Python's `float.__repr__` (which `json.dumps` uses), including
/// `NaN`, `Infinity` and `-Infinity` (`allow_nan=True` is the default).
///
/// Python uses the shortest round-tripping digits (as Rust does), written in fixed notation when
/// the decimal exponent is in `-4..16` (always with a fractional part, e.g. `1.0`), otherwise in
/// scientific notation with a signed exponent of at least two digits (`1e+16`, `1.5e-05`).
pub fn write_py_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("NaN");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16", "0e0".
    let sci = format!("{x:e}");
    let (negative, body) = match sci.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, sci.as_str()),
    };
    let (mantissa, exp) = body.split_once('e').unwrap_or((body, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if negative {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = (exp + 1) as usize;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push('0');
        }
        out.push_str(&abs.to_string());
    }
}

/// Appends any JSON value in Python `json.dumps` form. Object keys are written in the map's
/// iteration order.
pub fn write_py_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(itoa_i64(i).as_str());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(f) = n.as_f64() {
                write_py_float(out, f);
            } else {
                // Unreachable without serde_json's `arbitrary_precision`; keep its own text.
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_py_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_str(out, k);
                out.push_str(": ");
                write_py_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Serialises any JSON value exactly as Python's `json.dumps(value)` would (keys in the map's
/// iteration order).
pub fn to_py_json(v: &Value) -> String {
    let mut out = String::new();
    write_py_value(&mut out, v);
    out
}

/// Small stack buffer for formatting an `i64` without a heap allocation.
struct I64Buf {
    buf: [u8; 20],
    start: usize,
}

impl I64Buf {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or_default()
    }
}

fn itoa_i64(v: i64) -> I64Buf {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    let mut n = v.unsigned_abs();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        pos -= 1;
        buf[pos] = b'-';
    }
    I64Buf { buf, start: pos }
}

/// Ordered builder for Python-style JSON. Keys are written in call order, so the caller fixes
/// the key order of every object. The builder inserts the `", "` separators itself.
///
/// ```
/// use sync_core::pyjson::PyJsonWriter;
/// let mut w = PyJsonWriter::new();
/// w.begin_object()
///     .field_str("uri", "at://x")
///     .field_opt_str("indexed_at", None)
///     .key("nested")
///     .begin_object()
///     .field_bool("ok", true)
///     .end_object()
///     .end_object();
/// assert_eq!(w.as_str(), r#"{"uri": "at://x", "indexed_at": null, "nested": {"ok": true}}"#);
/// ```
///
/// The builder does not check nesting; a mismatched `begin_*`/`end_*` gives invalid JSON.
#[derive(Debug, Default, Clone)]
pub struct PyJsonWriter {
    buf: String,
    /// A value was just completed at the current level, so the next key or value needs `", "`.
    need_sep: bool,
}

impl PyJsonWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer whose buffer has room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: String::with_capacity(capacity),
            need_sep: false,
        }
    }

    /// Empties the buffer, keeping its allocation, so the writer can be reused.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.need_sep = false;
    }

    /// The JSON written so far.
    pub fn as_str(&self) -> &str {
        &self.buf
    }

    /// Consumes the writer and returns its JSON.
    pub fn into_string(self) -> String {
        self.buf
    }

    #[inline]
    fn sep(&mut self) {
        if self.need_sep {
            self.buf.push_str(", ");
        }
    }

    /// Starts an object (as a value: after `key`, inside an array, or at top level).
    pub fn begin_object(&mut self) -> &mut Self {
        self.sep();
        self.buf.push('{');
        self.need_sep = false;
        self
    }

    /// Ends the current object.
    pub fn end_object(&mut self) -> &mut Self {
        self.buf.push('}');
        self.need_sep = true;
        self
    }

    /// Starts an array (as a value).
    pub fn begin_array(&mut self) -> &mut Self {
        self.sep();
        self.buf.push('[');
        self.need_sep = false;
        self
    }

    /// Ends the current array.
    pub fn end_array(&mut self) -> &mut Self {
        self.buf.push(']');
        self.need_sep = true;
        self
    }

    /// Writes an object key and the `": "` separator; a value call must follow.
    pub fn key(&mut self, k: &str) -> &mut Self {
        self.sep();
        write_py_str(&mut self.buf, k);
        self.buf.push_str(": ");
        self.need_sep = false;
        self
    }

    /// Writes a string value.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.sep();
        write_py_str(&mut self.buf, s);
        self.need_sep = true;
        self
    }

    /// Writes a string value, or `null` for `None`.
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.str(s),
            None => self.null(),
        }
    }

    /// Writes `null`.
    pub fn null(&mut self) -> &mut Self {
        self.raw("null")
    }

    /// Writes `true` or `false`.
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.raw(if b { "true" } else { "false" })
    }

    /// Writes an integer.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        let digits = itoa_i64(v);
        self.raw(digits.as_str())
    }

    /// Writes an integer, or `null` for `None`.
    pub fn opt_i64(&mut self, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.i64(v),
            None => self.null(),
        }
    }

    /// Writes a float as Python's `repr` does.
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.sep();
        write_py_float(&mut self.buf, v);
        self.need_sep = true;
        self
    }

    /// Writes an arbitrary JSON value (see [`write_py_value`]).
    pub fn value(&mut self, v: &Value) -> &mut Self {
        self.sep();
        write_py_value(&mut self.buf, v);
        self.need_sep = true;
        self
    }

    /// Writes `json` verbatim as one value. The caller guarantees it is valid Python-style JSON.
    pub fn raw(&mut self, json: &str) -> &mut Self {
        self.sep();
        self.buf.push_str(json);
        self.need_sep = true;
        self
    }

    /// `key(k).str(v)`.
    pub fn field_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k).str(v)
    }

    /// `key(k).opt_str(v)`.
    pub fn field_opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        self.key(k).opt_str(v)
    }

    /// `key(k).null()`.
    pub fn field_null(&mut self, k: &str) -> &mut Self {
        self.key(k).null()
    }

    /// `key(k).bool(v)`.
    pub fn field_bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k).bool(v)
    }

    /// `key(k).i64(v)`.
    pub fn field_i64(&mut self, k: &str, v: i64) -> &mut Self {
        self.key(k).i64(v)
    }

    /// `key(k).opt_i64(v)`.
    pub fn field_opt_i64(&mut self, k: &str, v: Option<i64>) -> &mut Self {
        self.key(k).opt_i64(v)
    }

    /// `key(k).value(v)`.
    pub fn field_value(&mut self, k: &str, v: &Value) -> &mut Self {
        self.key(k).value(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn s(input: &str) -> String {
        py_str(input)
    }

    #[test]
    fn plain_ascii_is_verbatim_and_slash_not_escaped() {
        assert_eq!(s("hello, world"), r#""hello, world""#);
        assert_eq!(s("a/b https://x.y/z"), r#""a/b https://x.y/z""#);
        assert_eq!(s(" ~"), r#"" ~""#);
        assert_eq!(s("\\/"), r#""\\/""#);
        assert_eq!(s(""), r#""""#);
    }

    #[test]
    fn short_escapes() {
        assert_eq!(s("\""), r#""\"""#);
        assert_eq!(s("\\"), r#""\\""#);
        assert_eq!(s("\n"), r#""\n""#);
        assert_eq!(s("\r"), r#""\r""#);
        assert_eq!(s("\t"), r#""\t""#);
        assert_eq!(s("\u{8}"), r#""\b""#);
        assert_eq!(s("\u{c}"), r#""\f""#);
        assert_eq!(s("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    }

    #[test]
    fn other_control_chars_and_del_use_lowercase_u_escapes() {
        assert_eq!(s("\u{0}"), r#""\u0000""#);
        assert_eq!(s("\u{1}"), r#""\u0001""#);
        assert_eq!(s("\u{b}"), r#""\u000b""#);
        assert_eq!(s("\u{1f}"), r#""\u001f""#);
        assert_eq!(s("\u{7f}"), r#""\u007f""#);
    }

    #[test]
    fn non_ascii_bmp_is_lowercase_u_escaped() {
        assert_eq!(s("é"), r#""\u00e9""#);
        assert_eq!(s("région"), r#""r\u00e9gion""#);
        assert_eq!(s("—"), r#""\u2014""#);
        assert_eq!(s("\u{80}"), r#""\u0080""#);
        assert_eq!(s("\u{ffff}"), r#""\uffff""#);
        assert_eq!(s("\u{feff}x"), r#""\ufeffx""#);
        assert_eq!(s("日本"), r#""\u65e5\u672c""#);
    }

    #[test]
    fn astral_chars_become_surrogate_pairs() {
        assert_eq!(s("😀"), r#""\ud83d\ude00""#);
        assert_eq!(s("\u{10000}"), r#""\ud800\udc00""#);
        assert_eq!(s("\u{10ffff}"), r#""\udbff\udfff""#);
        assert_eq!(s("a😀b"), r#""a\ud83d\ude00b""#);
    }

    #[test]
    fn mixed_string() {
        // python3 -c 'import json; print(json.dumps("\x7f\u00e9\U0001F600/\b\f\x01"))'
        assert_eq!(
            s("\u{7f}é😀/\u{8}\u{c}\u{1}"),
            r#""\u007f\u00e9\ud83d\ude00/\b\f\u0001""#
        );
    }

    #[test]
    fn writer_separators_and_nesting() {
        let mut w = PyJsonWriter::new();
        w.begin_object()
            .field_str("a", "x")
            .field_null("b")
            .field_bool("c", false)
            .field_i64("d", -42)
            .field_opt_i64("e", None)
            .field_opt_str("f", Some("y"))
            .key("g")
            .begin_array()
            .i64(1)
            .str("two")
            .begin_object()
            .end_object()
            .begin_array()
            .end_array()
            .end_array()
            .key("h")
            .begin_object()
            .field_bool("t", true)
            .end_object()
            .end_object();
        assert_eq!(
            w.as_str(),
            r#"{"a": "x", "b": null, "c": false, "d": -42, "e": null, "f": "y", "g": [1, "two", {}, []], "h": {"t": true}}"#
        );
        w.clear();
        w.begin_object().end_object();
        assert_eq!(w.into_string(), "{}");
    }

    #[test]
    fn writer_escapes_keys() {
        let mut w = PyJsonWriter::new();
        w.begin_object().field_str("k\u{e9}\"", "v").end_object();
        assert_eq!(w.as_str(), r#"{"k\u00e9\"": "v"}"#);
    }

    #[test]
    fn integers() {
        for (v, want) in [
            (0i64, "0"),
            (7, "7"),
            (-1, "-1"),
            (1_000_000, "1000000"),
            (i64::MAX, "9223372036854775807"),
            (i64::MIN, "-9223372036854775808"),
        ] {
            let mut w = PyJsonWriter::new();
            w.i64(v);
            assert_eq!(w.as_str(), want);
        }
        assert_eq!(to_py_json(&json!(u64::MAX)), "18446744073709551615");
    }

    #[test]
    fn floats_match_python_repr() {
        // Expected values are CPython's repr().
        let cases = [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (-2.25, "-2.25"),
            (1234.5, "1234.5"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e22, "1e+22"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            let mut out = String::new();
            write_py_float(&mut out, x);
            assert_eq!(out, want, "repr({x:?})");
        }
    }

    #[test]
    fn generic_values() {
        let v = json!({"b": [1, 2.5, null, true, false], "a": {"$link": "bafy"}, "c": "é", "d": {}, "e": []});
        // serde_json without preserve_order iterates keys sorted.
        assert_eq!(
            to_py_json(&v),
            r#"{"a": {"$link": "bafy"}, "b": [1, 2.5, null, true, false], "c": "\u00e9", "d": {}, "e": []}"#
        );
        let mut w = PyJsonWriter::new();
        w.begin_object().field_value("x", &v["b"]).end_object();
        assert_eq!(w.as_str(), r#"{"x": [1, 2.5, null, true, false]}"#);
    }

    proptest! {
        // No regression files are written next to the crate; failures print the minimal input.
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn escaped_strings_are_ascii_and_round_trip(input in any::<String>()) {
            let out = py_str(&input);
            prop_assert!(out.is_ascii());
            prop_assert!(!out.bytes().any(|b| b < 0x20 || b == 0x7f));
            // `/` is never escaped: every `/` of the input appears as itself, and escapes add none.
            prop_assert_eq!(out.matches('/').count(), input.matches('/').count());
            let back: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(back, input);
        }

        #[test]
        fn printable_ascii_is_kept_verbatim(input in "[ -~]*") {
            let out = py_str(&input);
            let expected = format!("\"{}\"", input.replace('\\', "\\\\").replace('"', "\\\""));
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn floats_round_trip(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            let mut out = String::new();
            write_py_float(&mut out, x);
            let back: f64 = out.parse().unwrap();
            prop_assert_eq!(back.to_bits(), x.to_bits());
            prop_assert!(out.contains('.') || out.contains('e'));
        }
    }
}
