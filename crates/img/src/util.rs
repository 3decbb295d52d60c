//! Shared helpers: qemu-style size parsing and printing, `-o key=value,...` lists,
//! and the `-p` progress line.

use std::io::Write;

use crate::error::{CliError, CliResult};

/// The largest size qemu-img accepts for an image (`INT64_MAX`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Parses a size with an optional suffix (`k`, `M`, `G`, `T`, `P`, `E`, or `B` for bytes,
/// case-insensitive, powers of 1024) and an optional decimal fraction ("1.5G").
/// Returns `None` when the string is not a size.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_start();
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let (num, suffix) =
        match s.find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == 'x' || c == 'X')) {
            Some(p) => (&s[..p], &s[p..]),
            None => (s, ""),
        };
    // A hex number has no suffix letters that are hex digits (b/e) ambiguity: handle 0x first.
    if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let v = u64::from_str_radix(hex, 16).ok()?;
        let mult = suffix_mult(suffix)?;
        return v.checked_mul(mult);
    }
    // Decimal: digits, optional fraction, then the suffix (which may start with 'b'/'e').
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = (&s[..end], &s[end..]);
    let mult = suffix_mult(suffix)?;
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int_part.is_empty() || !int_part.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !frac_part.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int: u128 = int_part.parse().ok()?;
    let mut total = int.checked_mul(mult as u128)?;
    if !frac_part.is_empty() {
        let digits = frac_part.len().min(18);
        let frac: u128 = frac_part[..digits].parse().ok()?;
        let denom = 10u128.pow(digits as u32);
        total += frac * mult as u128 / denom;
    }
    u64::try_from(total).ok()
}

fn suffix_mult(suffix: &str) -> Option<u64> {
    Some(match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    })
}

/// Parses a size argument the way qemu-img's option parser does, with its error
/// wording: `Invalid <what> specified: '<value>'.` or a range error.
pub fn cvtnum(what: &str, value: &str, max: u64) -> CliResult<u64> {
    match parse_size(value) {
        Some(v) if v <= max => Ok(v),
        Some(_) => Err(CliError::msg(format!(
            "Invalid {what} specified. Must be between 0 and {max}."
        ))),
        None if looks_like_size(value) => Err(CliError::msg(format!(
            "Invalid {what} specified. Must be between 0 and {max}."
        ))),
        None => Err(CliError::msg(format!(
            "Invalid {what} specified: '{value}'."
        ))),
    }
}

/// Whether `s` is a well-formed size that is out of range (negative or too large).
fn looks_like_size(s: &str) -> bool {
    let t = s.trim_start();
    let t = t.strip_prefix('-').unwrap_or(t);
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    !t[..end].is_empty() && t[..end].parse::<f64>().is_ok() && suffix_mult(&t[end..]).is_some()
}

/// Formats a float like C's `printf("%.<prec>g")`.
pub fn fmt_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    let prec = prec.max(1);
    // Decide the exponent after rounding to `prec` significant digits.
    let sci = format!("{:.*e}", prec - 1, v);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{:.*}", decimals, v))
    }
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Formats a byte count the way QEMU's `size_to_str` does ("388 KiB", "1.5 GiB", "0 B").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp exponent: scaled = m * 2^e with m in [0.5, 1).
    let e = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = (((e - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g(val as f64 / div, 3), SUFFIXES[i])
}

/// One `key=value` pair from `-o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptPair {
    /// Option name.
    pub key: String,
    /// Option value (`None` for a bare key).
    pub value: Option<String>,
}

/// Parses a QemuOpts string: comma-separated `key=value` pairs, where `,,` is a literal comma.
pub fn parse_opts(s: &str) -> Vec<OptPair> {
    let mut out = Vec::new();
    for p in strata_image::split_options(s) {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push(OptPair {
                key: k.to_string(),
                value: Some(v.to_string()),
            }),
            None => out.push(OptPair {
                key: p,
                value: None,
            }),
        }
    }
    out
}

/// Joins several `-o` arguments into one list (qemu-img accepts `-o` more than once).
pub fn join_opts(list: &[String]) -> Vec<OptPair> {
    list.iter().flat_map(|s| parse_opts(s)).collect()
}

/// Whether an option list asks for help (`-o help` or `-o ?`).
pub fn wants_help(opts: &[OptPair]) -> bool {
    opts.iter()
        .any(|p| p.value.is_none() && (p.key == "help" || p.key == "?"))
}

/// Parses an on/off option value as QEMU does.
pub fn parse_bool(key: &str, v: &str) -> CliResult<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::msg(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// The `-p` progress indicator: prints "    (NN.NN/100%)\r" as work completes.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    last: f64,
}

impl Progress {
    /// A progress line, printed only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        let p = Progress {
            enabled,
            last: -1.0,
        };
        if enabled {
            p.print(0.0);
        }
        p
    }

    fn print(&self, pct: f64) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({:3.2}/100%)\r", pct);
        let _ = out.flush();
    }

    /// Reports `done` of `total` units.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        if pct - self.last >= 1.0 || (pct >= 100.0 && self.last < 100.0) {
            self.last = pct;
            self.print(pct);
        }
    }

    /// Finishes the line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.print(100.0);
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("1K"), Some(1024));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("1.5G"), Some(1610612736));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("512b"), Some(512));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("1E"), Some(1 << 60));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("-5"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("99E"), None);
    }

    #[test]
    fn cvtnum_messages() {
        let e = cvtnum("image size", "1x", MAX_SIZE)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "Invalid image size specified: '1x'.");
        let e = cvtnum("image size", "9E", MAX_SIZE)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }

    #[test]
    fn size_strings_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(12288), "12 KiB");
        assert_eq!(size_to_str(397312), "388 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(524800), "512 KiB");
        assert_eq!(size_to_str(1610612736), "1.5 GiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
    }

    #[test]
    fn g_format() {
        assert_eq!(fmt_g(1.5, 3), "1.5");
        assert_eq!(fmt_g(388.0, 3), "388");
        assert_eq!(fmt_g(0.9765625, 3), "0.977");
        assert_eq!(fmt_g(999.9, 3), "1e+03");
    }

    #[test]
    fn option_lists() {
        let o = parse_opts("compat=1.1,cluster_size=4k,,x,lazy_refcounts");
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].key, "compat");
        assert_eq!(o[0].value.as_deref(), Some("1.1"));
        assert_eq!(o[1].value.as_deref(), Some("4k,x"));
        assert_eq!(o[2].value, None);
        assert!(wants_help(&parse_opts("help")));
        assert!(wants_help(&parse_opts("compat=1.1,?")));
        let j = join_opts(&["a=1".into(), "b=2".into()]);
        assert_eq!(j.len(), 2);
    }
}
