//! `BlockdevOptions`: parsing the options of `blockdev-add` / `--blockdev` with
//! QAPI's strictness and QEMU's error texts, from JSON or from the key=value syntax
//! (where every scalar arrives as a string).

use serde_json::{Map, Value};

use crate::error::{BlockError, BlockResult};

/// What `discard=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discard requests are dropped.
    #[default]
    Ignore,
    /// Discard requests are passed down.
    Unmap,
}

/// What `detect-zeroes=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// No detection.
    #[default]
    Off,
    /// Writes of zeroes become zero writes.
    On,
    /// Writes of zeroes become zero writes that may unmap (with discard=unmap).
    Unmap,
}

impl DetectZeroes {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// A child given inline or by node name.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildRef {
    /// An existing node.
    Reference(String),
    /// A new node described inline.
    Inline(Box<BlockdevOptions>),
}

/// The `backing` member of a format node.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingRef {
    /// Absent: open the backing file named in the image.
    Default,
    /// `null`: no backing file.
    None,
    /// A child node.
    Child(ChildRef),
}

/// Driver-specific options.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    /// The `file` protocol.
    File {
        /// Host file name.
        filename: String,
    },
    /// A format (`raw`, `qcow2`) over a protocol child.
    Format {
        /// The protocol child.
        file: ChildRef,
        /// The backing child (qcow2 only).
        backing: BackingRef,
        /// qcow2 L2 cache size in bytes.
        l2_cache_size: Option<u64>,
        /// qcow2 refcount cache size in bytes.
        refcount_cache_size: Option<u64>,
    },
    /// `blkdebug`: error injection over an `image` child.
    BlkDebug {
        /// The child.
        image: ChildRef,
        /// The `inject-error` rules.
        inject: Vec<crate::blkdebug::InjectError>,
    },
    /// `null-co`: a disk of `size` bytes that reads zeroes and drops writes.
    Null {
        /// Virtual size.
        size: u64,
        /// `latency-ns`: how long each request takes.
        latency_ns: u64,
    },
}

/// Parsed `BlockdevOptions`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    /// Driver name.
    pub driver: String,
    /// Node name (auto-generated for implicit nodes).
    pub node_name: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// Fall back to read-only when the file cannot be opened read-write.
    pub auto_read_only: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `discard`.
    pub discard: DiscardMode,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// Driver-specific part.
    pub kind: DriverOptions,
}

/// Reads the members of one QAPI object, remembering which were used.
struct Members<'a> {
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
    keyval: bool,
    prefix: String,
}

fn type_error(name: &str, expected: &str) -> BlockError {
    BlockError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl<'a> Members<'a> {
    fn new(map: &'a Map<String, Value>, keyval: bool, prefix: String) -> Self {
        Members {
            map,
            used: Vec::new(),
            keyval,
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Value> {
        self.used.push(name);
        self.map.get(name)
    }

    fn string(&mut self, name: &'static str) -> BlockResult<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(type_error(&self.full(name), "string")),
        }
    }

    fn required_string(&mut self, name: &'static str) -> BlockResult<String> {
        self.string(name)?.ok_or_else(|| {
            BlockError::generic(format!("Parameter '{}' is missing", self.full(name)))
        })
    }

    fn bool(&mut self, name: &'static str) -> BlockResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(BlockError::generic(format!(
                    "Parameter '{}' expects 'on' or 'off'",
                    self.full(name)
                ))),
            },
            Some(_) => Err(type_error(&self.full(name), "boolean")),
        }
    }

    fn size(&mut self, name: &'static str) -> BlockResult<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| type_error(&self.full(name), "integer")),
            Some(Value::String(s)) if self.keyval => parse_size(s).map(Some).ok_or_else(|| {
                BlockError::generic(format!(
                    "Parameter '{}' expects a non-negative number below 2^64",
                    self.full(name)
                ))
            }),
            Some(_) => Err(type_error(&self.full(name), "integer")),
        }
    }

    fn finish(self) -> BlockResult<()> {
        for k in self.map.keys() {
            if !self.used.contains(&k.as_str()) {
                return Err(BlockError::generic(format!(
                    "Parameter '{}{k}' is unexpected",
                    self.prefix
                )));
            }
        }
        Ok(())
    }
}

/// Parses a size with QEMU's suffixes (k, M, G, T, P, E; powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return None,
    };
    n.checked_mul(mul)
}

fn enum_value<T: Copy>(
    m: &mut Members<'_>,
    name: &'static str,
    values: &[(&str, T)],
    default: T,
) -> BlockResult<T> {
    match m.get(name) {
        None => Ok(default),
        Some(Value::String(s)) => values
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                BlockError::generic(format!(
                    "Parameter '{}' does not accept value '{s}'",
                    m.full(name)
                ))
            }),
        Some(_) => Err(type_error(&m.full(name), "string")),
    }
}

const DRIVERS: &[&str] = &["blkdebug", "file", "raw", "qcow2", "null-co"];

fn child(v: &Value, keyval: bool, name: &str) -> BlockResult<ChildRef> {
    match v {
        Value::String(s) => Ok(ChildRef::Reference(s.clone())),
        Value::Object(_) => Ok(ChildRef::Inline(Box::new(parse_inner(
            v,
            keyval,
            &format!("{name}."),
        )?))),
        _ => Err(type_error(name, "BlockdevRef")),
    }
}

impl BlockdevOptions {
    /// Parses options given as JSON (`blockdev-add` arguments, `--blockdev {...}`).
    pub fn from_json(v: &Value) -> BlockResult<Self> {
        parse_inner(v, false, "")
    }

    /// Parses options from QEMU's key=value syntax with dotted nesting
    /// (`driver=qcow2,file.driver=file,file.filename=x.qcow2`).
    pub fn from_keyval(s: &str) -> BlockResult<Self> {
        parse_inner(&keyval_to_json(s)?, true, "")
    }
}

fn parse_inner(v: &Value, keyval: bool, prefix: &str) -> BlockResult<BlockdevOptions> {
    let map = v
        .as_object()
        .ok_or_else(|| type_error(prefix.trim_end_matches('.'), "object"))?;
    let mut m = Members::new(map, keyval, prefix.to_string());
    let driver = m.required_string("driver")?;
    if !DRIVERS.contains(&driver.as_str()) {
        return Err(BlockError::generic(format!(
            "Parameter '{}driver' does not accept value '{driver}'",
            prefix
        )));
    }
    let node_name = m.string("node-name")?;
    let read_only = m.bool("read-only")?.unwrap_or(false);
    let auto_read_only = m.bool("auto-read-only")?.unwrap_or(false);
    let _force_share = m.bool("force-share")?;
    let (cache_direct, cache_no_flush) = match m.get("cache") {
        None => (false, false),
        Some(Value::Object(c)) => {
            let mut cm = Members::new(c, keyval, format!("{prefix}cache."));
            let d = cm.bool("direct")?.unwrap_or(false);
            let n = cm.bool("no-flush")?.unwrap_or(false);
            cm.finish()?;
            (d, n)
        }
        Some(_) => return Err(type_error(&format!("{prefix}cache"), "object")),
    };
    let discard = enum_value(
        &mut m,
        "discard",
        &[
            ("ignore", DiscardMode::Ignore),
            ("off", DiscardMode::Ignore),
            ("unmap", DiscardMode::Unmap),
            ("on", DiscardMode::Unmap),
        ],
        DiscardMode::Ignore,
    )?;
    let detect_zeroes = enum_value(
        &mut m,
        "detect-zeroes",
        &[
            ("off", DetectZeroes::Off),
            ("on", DetectZeroes::On),
            ("unmap", DetectZeroes::Unmap),
        ],
        DetectZeroes::Off,
    )?;
    let kind = match driver.as_str() {
        "file" => {
            let filename = m.required_string("filename")?;
            enum_value(
                &mut m,
                "aio",
                &[("threads", ()), ("native", ()), ("io_uring", ())],
                (),
            )?;
            enum_value(
                &mut m,
                "locking",
                &[("auto", ()), ("on", ()), ("off", ())],
                (),
            )?;
            DriverOptions::File { filename }
        }
        "blkdebug" => {
            let image = match m.get("image") {
                Some(v) => child(v, keyval, &format!("{prefix}image"))?,
                None => {
                    return Err(BlockError::generic(format!(
                        "Parameter '{prefix}image' is missing"
                    )))
                }
            };
            let mut inject = Vec::new();
            match m.get("inject-error") {
                None => {}
                Some(Value::Array(rules)) => {
                    for (i, r) in rules.iter().enumerate() {
                        inject.push(parse_inject(
                            r,
                            keyval,
                            &format!("{prefix}inject-error[{i}]."),
                        )?);
                    }
                }
                Some(_) => return Err(type_error(&format!("{prefix}inject-error"), "array")),
            }
            DriverOptions::BlkDebug { image, inject }
        }
        "null-co" => {
            // Strata's null-co always reads zeroes: that is `read-zeroes=on`, and a
            // valid answer for `off` too (QEMU then leaves the buffer unspecified).
            let _read_zeroes = m.bool("read-zeroes")?;
            DriverOptions::Null {
                size: m.size("size")?.unwrap_or(1 << 30),
                latency_ns: m.size("latency-ns")?.unwrap_or(0),
            }
        }
        _ => {
            let file = match m.get("file") {
                Some(v) => child(v, keyval, &format!("{prefix}file"))?,
                None => {
                    return Err(BlockError::generic(format!(
                        "Parameter '{prefix}file' is missing"
                    )))
                }
            };
            let mut backing = BackingRef::Default;
            let mut l2 = None;
            let mut rc = None;
            if driver == "qcow2" {
                backing = match m.get("backing") {
                    None => BackingRef::Default,
                    Some(Value::Null) => BackingRef::None,
                    Some(Value::String(s)) if keyval && s.is_empty() => BackingRef::None,
                    Some(v) => BackingRef::Child(child(v, keyval, &format!("{prefix}backing"))?),
                };
                l2 = m.size("l2-cache-size")?;
                rc = m.size("refcount-cache-size")?;
                let _ = m.size("cache-size")?;
                let _ = m.bool("lazy-refcounts")?;
                let _ = m.bool("pass-discard-request")?;
                let _ = m.bool("pass-discard-snapshot")?;
                let _ = m.bool("pass-discard-other")?;
                let _ = m.bool("discard-no-unref")?;
            }
            DriverOptions::Format {
                file,
                backing,
                l2_cache_size: l2,
                refcount_cache_size: rc,
            }
        }
    };
    m.finish()?;
    Ok(BlockdevOptions {
        driver,
        node_name,
        read_only,
        auto_read_only,
        cache_direct,
        cache_no_flush,
        discard,
        detect_zeroes,
        kind,
    })
}

fn parse_inject(
    v: &Value,
    keyval: bool,
    prefix: &str,
) -> BlockResult<crate::blkdebug::InjectError> {
    use crate::blkdebug::{InjectError, IoType};
    let map = v
        .as_object()
        .ok_or_else(|| type_error(prefix.trim_end_matches('.'), "object"))?;
    let mut m = Members::new(map, keyval, prefix.to_string());
    let event = m.required_string("event")?;
    let by_event = match event.as_str() {
        "read_aio" => Some(IoType::Read),
        "write_aio" | "pwritev" => Some(IoType::Write),
        "flush_to_disk" => Some(IoType::Flush),
        "none" => None,
        other => {
            return Err(BlockError::generic(format!(
                "Parameter '{prefix}event' does not accept value '{other}'"
            )))
        }
    };
    let iotype = enum_value(
        &mut m,
        "iotype",
        &[
            ("read", Some(IoType::Read)),
            ("write", Some(IoType::Write)),
            ("write-zeroes", Some(IoType::WriteZeroes)),
            ("discard", Some(IoType::Discard)),
            ("flush", Some(IoType::Flush)),
        ],
        None,
    )?;
    let errno = m.size("errno")?.unwrap_or(5) as i32;
    let sector = m.size("sector")?;
    let once = m.bool("once")?.unwrap_or(false);
    let _ = m.bool("immediately")?;
    let _ = m.size("state")?;
    m.finish()?;
    let iotype = iotype
        .or(by_event)
        .ok_or_else(|| BlockError::generic(format!("{prefix}event 'none' needs an iotype")))?;
    Ok(InjectError {
        iotype,
        errno,
        sector,
        once,
    })
}

/// Turns `a=1,b.c=2,b.d=x` into `{"a":"1","b":{"c":"2","d":"x"}}` (QEMU's keyval
/// syntax: commas in values are doubled; a key without `=` is an error).
pub fn keyval_to_json(s: &str) -> BlockResult<Value> {
    let mut root = Map::new();
    for p in strata_image::split_options(s)
        .into_iter()
        .filter(|p| !p.is_empty())
    {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| BlockError::generic(format!("Expected '=' after parameter '{p}'")))?;
        let parts: Vec<&str> = k.split('.').collect();
        if parts.iter().any(|x| x.is_empty()) {
            return Err(BlockError::generic(format!("Invalid parameter '{k}'")));
        }
        let mut obj = &mut root;
        for part in &parts[..parts.len() - 1] {
            let entry = obj
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            obj = entry.as_object_mut().ok_or_else(|| {
                BlockError::generic(format!("Parameter '{k}' used inconsistently"))
            })?;
        }
        let last = parts[parts.len() - 1];
        if obj.contains_key(last) {
            return Err(BlockError::generic(format!(
                "Parameter '{k}' used inconsistently"
            )));
        }
        obj.insert(last.to_string(), Value::String(v.to_string()));
    }
    Ok(Value::Object(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_nesting() {
        let o = BlockdevOptions::from_keyval(
            "driver=qcow2,node-name=q0,file.driver=file,file.filename=a,,b.qcow2,read-only=on,cache.direct=on",
        )
        .unwrap();
        assert_eq!(o.node_name.as_deref(), Some("q0"));
        assert!(o.read_only && o.cache_direct);
        match o.kind {
            DriverOptions::Format {
                file: ChildRef::Inline(f),
                ..
            } => {
                assert_eq!(
                    f.kind,
                    DriverOptions::File {
                        filename: "a,b.qcow2".into()
                    }
                )
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn qapi_errors() {
        let e = BlockdevOptions::from_json(&json!({"driver": "foo"})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'driver' does not accept value 'foo'");
        let e = BlockdevOptions::from_json(&json!({"driver": "file"})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'filename' is missing");
        let e = BlockdevOptions::from_json(&json!({"driver": "file", "filename": "x", "bogus": 1}))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
        let e = BlockdevOptions::from_json(&json!({"driver": "file", "filename": 3})).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'filename', expected: string"
        );
        let e = BlockdevOptions::from_json(
            &json!({"driver": "qcow2", "file": {"driver": "file", "filename": "x", "x": 1}}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'file.x' is unexpected");
    }

    #[test]
    fn backing_null_and_reference() {
        let o =
            BlockdevOptions::from_json(&json!({"driver": "qcow2", "file": "f0", "backing": null}))
                .unwrap();
        assert!(matches!(
            o.kind,
            DriverOptions::Format {
                backing: BackingRef::None,
                ..
            }
        ));
        let o =
            BlockdevOptions::from_json(&json!({"driver": "qcow2", "file": "f0", "backing": "b"}))
                .unwrap();
        assert!(matches!(
            o.kind,
            DriverOptions::Format {
                backing: BackingRef::Child(ChildRef::Reference(_)),
                ..
            }
        ));
    }
}
