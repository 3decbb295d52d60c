//! JSON output exactly as QEMU's monitor prints it.
//!
//! * Separators are `", "` and `": "`, no other whitespace.
//! * Everything outside printable ASCII is escaped as `\uXXXX` (upper-case
//!   hex, surrogate pairs above U+FFFF); `"`, `\\` and `\b \f \n \r \t` use
//!   their short escapes.
//! * Floats print like C's `%.17g`.
//! * Object members come out in the iteration order of QEMU's `QDict`: a
//!   512-bucket hash table (the tdb hash of the key) walked bucket by bucket,
//!   where a later insertion in the same bucket comes first.

use crate::json::Json;

const QDICT_BUCKETS: u32 = 512;

/// The `QDict` bucket of a key (tdb hash modulo 512).
pub fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut v = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % QDICT_BUCKETS
}

/// Indices of `members` in QEMU's `QDict` iteration order, given that they
/// were inserted in slice order.
pub fn qdict_order<T>(members: &[(String, T)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..members.len()).collect();
    idx.sort_by_key(|&i| (qdict_bucket(&members[i].0), std::cmp::Reverse(i)));
    idx
}

/// Formats a float like C's `printf("%.17g")`.
pub fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    const P: i32 = 17;
    let sci = format!("{:.*e}", (P - 1) as usize, x);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..P).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{}{:02}", strip(mant), sign, exp.abs())
    } else {
        let decimals = (P - 1 - exp).max(0) as usize;
        strip(&format!("{:.*}", decimals, x))
    }
}

fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(ch),
            _ => {
                let mut buf = [0u16; 2];
                for unit in ch.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04X}", unit));
                }
            }
        }
    }
    out.push('"');
}

fn push_value(out: &mut String, v: &Json) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(i) => out.push_str(&i.to_string()),
        Json::UInt(u) => out.push_str(&u.to_string()),
        Json::Float(f) => out.push_str(&format_g17(*f)),
        Json::Str(s) => push_string(out, s),
        Json::Array(a) => {
            out.push('[');
            for (n, item) in a.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                push_value(out, item);
            }
            out.push(']');
        }
        Json::Object(m) => {
            out.push('{');
            for (n, i) in qdict_order(m).into_iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                push_string(out, &m[i].0);
                out.push_str(": ");
                push_value(out, &m[i].1);
            }
            out.push('}');
        }
    }
}

/// Serialises a value the way QEMU's `qobject_to_json()` does.
pub fn to_json_string(v: &Json) -> String {
    let mut s = String::new();
    push_value(&mut s, v);
    s
}

/// One complete wire message: the JSON text followed by CRLF.
pub fn to_wire(v: &Json) -> Vec<u8> {
    let mut s = to_json_string(v);
    s.push_str("\r\n");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn round(input: &str) -> String {
        to_json_string(&parse(input.as_bytes()).unwrap())
    }

    #[test]
    fn key_order_matches_qemu() {
        // Observed from qemu-storage-daemon 10.0.2.
        assert_eq!(
            round(r#"{"b":1,"a":2,"execute":3,"id":4,"return":5,"error":6,"zz":{}}"#),
            r#"{"a": 2, "execute": 3, "zz": {}, "b": 1, "return": 5, "id": 4, "error": 6}"#
        );
        assert_eq!(
            round(r#"{"major":10,"minor":0,"micro":2}"#),
            r#"{"micro": 2, "minor": 0, "major": 10}"#
        );
    }

    #[test]
    fn floats_match_printf() {
        let cases = [
            (0.1, "0.10000000000000001"),
            (1.0, "1"),
            (-0.0, "-0"),
            (1e20, "1e+20"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (100000.0, "100000"),
            (2.5, "2.5"),
            (1.1, "1.1000000000000001"),
            (1.5e300, "1.5000000000000001e+300"),
            (0.000012345, "1.2345e-05"),
            (123456789012345678.5, "1.2345678901234568e+17"),
            (f64::INFINITY, "inf"),
        ];
        for (x, s) in cases {
            assert_eq!(format_g17(x), s, "{x}");
        }
    }

    #[test]
    fn strings_escape_to_ascii() {
        assert_eq!(
            round("\"a/b\\\\\\\"\\u0001\\u007f\\ud83d\\ude00\\t\\b\\f\\n\\r<>&'\u{e9}\""),
            "\"a/b\\\\\\\"\\u0001\\u007F\\uD83D\\uDE00\\t\\b\\f\\n\\r<>&'\\u00E9\""
        );
    }
}
