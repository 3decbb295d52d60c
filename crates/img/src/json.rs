//! A small JSON value and the two printers qemu-img's output needs: the pretty form
//! of QEMU's QObject printer (4-space indent, empty containers on two lines) and
//! the key order of QEMU's QDict (a 512-bucket hash table, newest entry first within
//! a bucket), so that `--output=json` matches qemu-img byte for byte.

use std::fmt::Write as _;

/// A JSON value whose objects keep the order in which fields were added.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    Uint(u64),
    /// A string.
    Str(String),
    /// An array.
    List(Vec<Json>),
    /// An object, fields in insertion (QAPI declaration) order.
    Obj(Vec<(String, Json)>),
}

/// Builds an object field by field.
#[derive(Debug, Default)]
pub struct ObjBuilder(Vec<(String, Json)>);

impl ObjBuilder {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a field.
    pub fn field(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.0.push((key.to_string(), value.into()));
        self
    }

    /// Adds a field when `value` is `Some`.
    pub fn opt(self, key: &str, value: Option<impl Into<Json>>) -> Self {
        match value {
            Some(v) => self.field(key, v),
            None => self,
        }
    }

    /// The finished object.
    pub fn build(self) -> Json {
        Json::Obj(self.0)
    }
}

impl From<bool> for Json {
    fn from(v: bool) -> Self {
        Json::Bool(v)
    }
}
impl From<u64> for Json {
    fn from(v: u64) -> Self {
        Json::Uint(v)
    }
}
impl From<i64> for Json {
    fn from(v: i64) -> Self {
        Json::Int(v)
    }
}
impl From<u32> for Json {
    fn from(v: u32) -> Self {
        Json::Uint(v.into())
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Self {
        Json::Str(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Self {
        Json::Str(v)
    }
}
impl From<Vec<Json>> for Json {
    fn from(v: Vec<Json>) -> Self {
        Json::List(v)
    }
}

/// Number of hash buckets in QEMU's QDict.
const QDICT_BUCKETS: u32 = 512;

/// The string hash QEMU's QDict uses to place a key in a bucket.
pub fn qdict_hash(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = ((i as u32) * 5) % 24;
        value = value.wrapping_add((b as u32) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The order in which QEMU iterates a QDict whose keys were inserted in `keys` order.
pub fn qdict_order(keys: &[&str]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    // Ascending bucket; within a bucket, the most recently inserted entry comes first.
    idx.sort_by_key(|&i| (qdict_hash(keys[i]) % QDICT_BUCKETS, std::cmp::Reverse(i)));
    idx
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04X}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_pretty(out: &mut String, v: &Json, level: usize) {
    match v {
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Json::Uint(u) => {
            let _ = write!(out, "{u}");
        }
        Json::Str(s) => write_str(out, s),
        Json::List(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_pretty(out, item, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        Json::Obj(fields) => {
            out.push('{');
            let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            for (n, i) in qdict_order(&keys).into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_str(out, &fields[i].0);
                out.push_str(": ");
                write_pretty(out, &fields[i].1, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
    }
}

/// Prints `v` the way qemu-img prints QAPI objects with `--output=json` (no trailing newline).
pub fn to_qemu_pretty(v: &Json) -> String {
    let mut out = String::new();
    write_pretty(&mut out, v, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_report_key_order_matches_qemu() {
        // Key order qemu-img check --output=json prints for a clean qcow2 image.
        let keys = [
            "filename",
            "format",
            "check-errors",
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
        ];
        let order: Vec<&str> = qdict_order(&keys).into_iter().map(|i| keys[i]).collect();
        assert_eq!(
            order,
            [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "allocated-clusters",
                "filename",
                "format"
            ]
        );
    }

    #[test]
    fn qcow2_specific_key_order_matches_qemu() {
        let keys = [
            "compat",
            "extended-l2",
            "lazy-refcounts",
            "corrupt",
            "refcount-bits",
            "compression-type",
        ];
        let order: Vec<&str> = qdict_order(&keys).into_iter().map(|i| keys[i]).collect();
        assert_eq!(
            order,
            [
                "compat",
                "compression-type",
                "lazy-refcounts",
                "refcount-bits",
                "corrupt",
                "extended-l2"
            ]
        );
    }

    #[test]
    fn pretty_prints_empty_containers_on_two_lines() {
        let v = ObjBuilder::new()
            .field("children", Json::List(vec![]))
            .field("data", ObjBuilder::new().build())
            .build();
        let s = to_qemu_pretty(&v);
        assert!(s.contains("\"children\": [\n    ]"), "{s}");
        assert!(s.contains("\"data\": {\n    }"), "{s}");
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\n");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\"");
    }
}
