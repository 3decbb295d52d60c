//! `strata-img bench`: qemu-img's simple I/O benchmark. `count` requests of
//! `buffer size` bytes at `offset`, `offset + step`, ... (wrapping at the image end),
//! with `depth` requests really in flight at once (one worker thread per slot, the
//! buffers from one huge-page allocation),
//! optional flushes every `--flush-interval` requests (draining the queue first
//! unless `--no-drain`). Prints the same lines as qemu-img bench.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use strata_image::storage::AlignedBuf;
use strata_image::{BackingChoice, CacheMode, FormatDriver};

use crate::error::{CliError, CliResult};
use crate::image::{open, parse_cache, OpenArgs};
use crate::util::parse_size;

/// Options of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of requests (default 75000).
    #[arg(short = 'c', allow_hyphen_values = true)]
    count: Option<String>,
    /// Queue depth: requests in flight at once (default 64).
    #[arg(short = 'd', allow_hyphen_values = true)]
    depth: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Native AIO (accepted; requests are issued by worker threads).
    #[arg(short = 'n')]
    native: bool,
    /// AIO engine: threads, native or io_uring (accepted).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', allow_hyphen_values = true)]
    offset: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Buffer size of each request (default 4k).
    #[arg(short = 's', allow_hyphen_values = true)]
    bufsize: Option<String>,
    /// Step between request offsets (default: the buffer size).
    #[arg(short = 'S', allow_hyphen_values = true)]
    step: Option<String>,
    /// Cache mode (default writeback).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Byte written by write requests.
    #[arg(long = "pattern", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush every N requests (write tests only).
    #[arg(long = "flush-interval", allow_hyphen_values = true)]
    flush_interval: Option<String>,
    /// Do not drain the queue before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// The image file.
    filename: String,
}

/// Parses an unsigned number the way `strtoul(.., 0)` does (decimal, 0x hex, 0 octal).
pub fn parse_ulong(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

fn num_arg(v: &Option<String>, what: &str, min: u64, max: u64, default: u64) -> CliResult<u64> {
    let range = || {
        CliError::msg(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))
    };
    match v {
        None => Ok(default),
        Some(s) => match parse_ulong(s) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(_) => Err(range()),
            None if s.trim().strip_prefix('-').and_then(parse_ulong).is_some() => Err(range()),
            None => Err(CliError::msg(format!("Invalid {what} specified: '{s}'."))),
        },
    }
}

fn size_arg(v: &Option<String>, what: &str, min: u64, max: u64, default: u64) -> CliResult<u64> {
    match v {
        None => Ok(default),
        Some(s) => match parse_size(s) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(_) => Err(CliError::msg(format!(
                "Invalid {what} specified. Must be between {min} and {max}."
            ))),
            None => Err(CliError::msg(format!("Invalid {what} specified: '{s}'."))),
        },
    }
}
/// The offset of request number `i`, as qemu-img bench walks them.
pub fn request_offset(first: u64, step: u64, size: u64, i: u64) -> u64 {
    if i == 0 {
        return first;
    }
    if size == 0 {
        return 0;
    }
    ((first as u128 + i as u128 * step as u128) % size as u128) as u64
}

struct Shared {
    img: Arc<dyn FormatDriver>,
    next: AtomicU64,
    completed: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// For drained flushes: requests may be issued up to this index.
    gate: Mutex<u64>,
    gate_cv: Condvar,
}

/// Runs `bench`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = (args.force_share, args.native);
    let int_max = i32::MAX as u64;
    let count = num_arg(&args.count, "request count", 1, int_max, 75000)?;
    let depth = num_arg(&args.depth, "queue depth", 1, int_max, 64)?;
    if let Some(a) = &args.aio {
        if !["threads", "native", "io_uring"].contains(&a.as_str()) {
            return Err(CliError::msg(format!("Invalid aio option: {a}")));
        }
    }
    let first = size_arg(&args.offset, "offset", 0, i64::MAX as u64, 0)?;
    let bufsize = size_arg(&args.bufsize, "buffer size", 1, int_max, 4096)?;
    let step = size_arg(&args.step, "step_size", 0, int_max, 0)?;
    let cache = parse_cache(args.cache.as_deref(), CacheMode::Writeback)
        .map_err(|_| CliError::msg("Invalid cache mode"))?;
    let pattern = num_arg(&args.pattern, "pattern byte", 0, 0xff, 0)? as u8;
    let flush_interval = num_arg(&args.flush_interval, "flush interval", 0, int_max, 0)?;
    if !args.write && flush_interval != 0 {
        return Err(CliError::msg(
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval != 0 && flush_interval < depth {
        return Err(CliError::msg("Flush interval can't be smaller than depth"));
    }
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: args.write,
            cache,
            backing: BackingChoice::FromImage,
        },
    )?;
    let size = img.size();
    let step = if step == 0 { bufsize } else { step };
    if !args.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            count,
            if args.write { "write" } else { "read" },
            bufsize,
            depth,
            first,
            step
        );
        if flush_interval != 0 {
            println!("Sending flush every {flush_interval} requests");
        }
    }
    let shared = Arc::new(Shared {
        img: img.clone(),
        next: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        gate: Mutex::new(if flush_interval != 0 && !args.no_drain {
            flush_interval.min(count)
        } else {
            count
        }),
        gate_cv: Condvar::new(),
    });
    let drain = flush_interval != 0 && !args.no_drain;
    let threads = depth.min(count.max(1)).min(1024) as usize;
    // One buffer for all requests in flight, as qemu-img allocates it, from huge
    // pages: each request's buffer is then physically contiguous and reaches the disk
    // as one segment rather than one per 4 KiB page. Filled before the clock starts.
    let mut pool = AlignedBuf::huge(threads * bufsize as usize);
    pool.fill(pattern);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for buf in pool.chunks_exact_mut(bufsize as usize) {
            let sh = shared.clone();
            scope.spawn(move || {
                loop {
                    if sh.failed.load(Ordering::Relaxed) {
                        return;
                    }
                    // Claim the next request, waiting at a drain point if needed.
                    let i = if !drain {
                        let i = sh.next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return;
                        }
                        i
                    } else {
                        let mut gate = sh.gate.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if sh.failed.load(Ordering::Relaxed) {
                                return;
                            }
                            let i = sh.next.load(Ordering::Relaxed);
                            if i >= count {
                                return;
                            }
                            if i < *gate {
                                sh.next.store(i + 1, Ordering::Relaxed);
                                break i;
                            }
                            gate = sh.gate_cv.wait(gate).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    let off = request_offset(first, step, size, i);
                    let res = if args.write {
                        sh.img.write(buf, off)
                    } else {
                        sh.img.read(buf, off)
                    };
                    if let Err(e) = res {
                        let mut slot = sh.error.lock().unwrap_or_else(|p| p.into_inner());
                        let past_end = off.saturating_add(bufsize) > size;
                        slot.get_or_insert_with(|| {
                            if past_end {
                                "Failed request: Input/output error".to_string()
                            } else {
                                format!("Failed request: {e}")
                            }
                        });
                        sh.failed.store(true, Ordering::Relaxed);
                        sh.gate_cv.notify_all();
                        return;
                    }
                    let done = sh.completed.fetch_add(1, Ordering::AcqRel) + 1;
                    if flush_interval != 0 && done % flush_interval == 0 {
                        if drain {
                            // Every request before the drain point has completed: flush, then open the gate.
                            let mut gate = sh.gate.lock().unwrap_or_else(|p| p.into_inner());
                            if let Err(e) = sh.img.flush() {
                                let mut slot = sh.error.lock().unwrap_or_else(|p| p.into_inner());
                                slot.get_or_insert_with(|| format!("Failed flush request: {e}"));
                                sh.failed.store(true, Ordering::Relaxed);
                            }
                            *gate = (done + flush_interval).min(count);
                            sh.gate_cv.notify_all();
                        } else if let Err(e) = sh.img.flush() {
                            let mut slot = sh.error.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert_with(|| format!("Failed flush request: {e}"));
                            sh.failed.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = shared
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(CliError::msg(e));
    }
    if args.write {
        img.close()?;
    }
    if !args.quiet {
        println!("Run completed in {elapsed:3.3} seconds.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_like_qemu() {
        assert_eq!(request_offset(0, 4096, 1 << 20, 0), 0);
        assert_eq!(request_offset(0, 4096, 1 << 20, 256), 0);
        assert_eq!(request_offset(4096, 4096, 1 << 20, 1), 8192);
        assert_eq!(request_offset(5 << 20, 4096, 1 << 20, 0), 5 << 20);
    }

    #[test]
    fn strtoul_bases() {
        assert_eq!(parse_ulong("10"), Some(10));
        assert_eq!(parse_ulong("0x10"), Some(16));
        assert_eq!(parse_ulong("010"), Some(8));
        assert_eq!(parse_ulong("x"), None);
    }
}
