//! A subset of `qemu-io`'s command language, run against a node: what QMP's
//! `human-monitor-command "qemu-io NODE \"...\""` uses to simulate guest I/O
//! (`read`, `write`, `aio_write`, `discard`, `flush` with `-P`, `-z`, `-u`, `-v`).
//! The output mimics qemu-io's lines.

use std::time::Instant;

use crate::node::BlockNode;
use crate::options::parse_size;

/// Largest single request accepted (qemu-io refuses more than 2 GiB too).
const MAX_REQUEST: u64 = 1 << 31;

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    v /= 1024.0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[u])
}

fn timing(len: u64, start: Instant) -> String {
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    format!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        human(len),
        secs,
        human((len as f64 / secs) as u64),
        1.0 / secs
    )
}

/// Splits a command line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn parse_num(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    parse_size(s)
}

/// Runs one qemu-io command on `node`; returns what qemu-io would print.
pub fn run(node: &BlockNode, line: &str) -> String {
    let w = words(line);
    let Some(cmd) = w.first() else {
        return String::new();
    };
    let mut pattern: Option<u8> = None;
    let mut zero = false;
    let mut unmap = false;
    let mut verbose = false;
    let mut pos = Vec::new();
    let mut i = 1;
    while i < w.len() {
        match w[i].as_str() {
            "-P" => {
                i += 1;
                match w.get(i).and_then(|p| parse_num(p)) {
                    Some(p) if p <= 255 => pattern = Some(p as u8),
                    _ => return format!("{cmd}: invalid pattern\n"),
                }
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-v" => verbose = true,
            "-q" | "-C" | "-f" | "-n" | "-p" => {}
            s if s.starts_with('-') && s.len() > 1 => {
                return format!("{cmd}: invalid option -- '{}'\n", &s[1..]);
            }
            s => pos.push(s.to_string()),
        }
        i += 1;
    }
    let range = || -> Result<(u64, u64), String> {
        if pos.len() != 2 {
            return Err(format!("{cmd}: wrong number of arguments\n"));
        }
        let off = parse_num(&pos[0])
            .ok_or_else(|| format!("non-numeric offset argument -- {}\n", pos[0]))?;
        let len = parse_num(&pos[1])
            .ok_or_else(|| format!("non-numeric length argument -- {}\n", pos[1]))?;
        if len > MAX_REQUEST {
            return Err(format!("length cannot exceed {MAX_REQUEST}, given {len}\n"));
        }
        Ok((off, len))
    };
    let start = Instant::now();
    match cmd.as_str() {
        "read" | "aio_read" => {
            let (off, len) = match range() {
                Ok(r) => r,
                Err(e) => return e,
            };
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = node.read(&mut buf, off) {
                return format!("read failed: {e}\n");
            }
            let mut out = String::new();
            if let Some(p) = pattern {
                if let Some(bad) = buf.iter().position(|&b| b != p) {
                    out.push_str(&format!(
                        "Pattern verification failed at offset {}, {len} bytes\n",
                        off + bad as u64
                    ));
                }
            }
            if verbose {
                for (k, chunk) in buf.chunks(16).enumerate() {
                    let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                    let asc: String = chunk
                        .iter()
                        .map(|&b| {
                            if (0x20..0x7f).contains(&b) {
                                b as char
                            } else {
                                '.'
                            }
                        })
                        .collect();
                    out.push_str(&format!(
                        "{:08x}:  {}  {}\n",
                        off + k as u64 * 16,
                        hex.join(" "),
                        asc
                    ));
                }
            }
            out.push_str(&format!("read {len}/{len} bytes at offset {off}\n"));
            out.push_str(&timing(len, start));
            out.push('\n');
            out
        }
        "write" | "aio_write" => {
            let (off, len) = match range() {
                Ok(r) => r,
                Err(e) => return e,
            };
            let r = if zero {
                node.write_zeroes(off, len, unmap)
            } else {
                node.write(&vec![pattern.unwrap_or(0xcd); len as usize], off)
            };
            if let Err(e) = r {
                return format!("write failed: {e}\n");
            }
            format!(
                "wrote {len}/{len} bytes at offset {off}\n{}\n",
                timing(len, start)
            )
        }
        "discard" | "aio_discard" => {
            let (off, len) = match range() {
                Ok(r) => r,
                Err(e) => return e,
            };
            if let Err(e) = node.discard(off, len) {
                return format!("discard failed: {e}\n");
            }
            format!(
                "discard {len}/{len} bytes at offset {off}\n{}\n",
                timing(len, start)
            )
        }
        "flush" | "aio_flush" => match node.flush() {
            Ok(()) => String::new(),
            Err(e) => format!("flush failed: {e}\n"),
        },
        other => format!("command \"{other}\" not found\n"),
    }
}

/// Parses `qemu-io [-d] NODE "CMD"` from a human monitor command line: returns the
/// node name and the qemu-io command.
pub fn parse_hmp(line: &str) -> Option<(String, String)> {
    let w = words(line);
    let mut it = w.into_iter();
    if it.next()? != "qemu-io" {
        return None;
    }
    let mut node = it.next()?;
    if node == "-d" {
        node = it.next()?;
    }
    let cmd = it.next()?;
    Some((node, cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmp_line_parsing() {
        assert_eq!(
            parse_hmp(r#"qemu-io drive0 "write -P 0x5a 0 64k""#),
            Some(("drive0".into(), "write -P 0x5a 0 64k".into()))
        );
        assert_eq!(
            parse_hmp(r#"qemu-io -d q0 "flush""#),
            Some(("q0".into(), "flush".into()))
        );
        assert_eq!(parse_hmp("info block"), None);
    }

    #[test]
    fn sizes_print_like_qemu_io() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(65536), "64 KiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
