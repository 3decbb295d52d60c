//! `strata-img convert`: copies one or more source images (concatenated) into a new
//! or existing target, skipping what block status says needs no copy, keeping zero
//! runs sparse (`-S`), optionally compressing (`-c`), with several copy workers.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use strata_image::storage::AlignedBuf;
use strata_image::{resolve_backing_path, BackingChoice, CacheMode, Format, FormatDriver};

use crate::create::{parse_create_opts, print_option_help, validate};
use crate::error::{CliError, CliResult};
use crate::image::{chain_status, is_zero, layers, open, parse_cache, OpenArgs};
use crate::util::{join_opts, parse_size, wants_help, Progress};

/// Options of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Target format (default raw).
    #[arg(short = 'O')]
    out_format: Option<String>,
    /// Target create options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the target (qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Minimum run of zeroes to keep sparse (default 4k; 0 allocates fully).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Do not create the target; it must exist.
    #[arg(short = 'n')]
    no_create: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Target cache mode (default unsafe).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode (default writeback).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Backing file of the target; only the source's top layer is copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Backing format of the target.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Number of parallel copy workers (default 8).
    #[arg(short = 'm')]
    workers: Option<String>,
    /// Allow out-of-order writes to the target.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Accepted for compatibility (copy offloading is not used).
    #[arg(short = 'C')]
    copy_offload: bool,
    /// The existing target (with -n) already reads as zeroes.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image(s) followed by the target.
    #[arg(num_args = 1.., required = true)]
    files: Vec<String>,
}

const BUF_SIZE: u64 = 2 << 20;

/// What to do with one extent of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Copy data.
    Data,
    /// Make it read as zeroes.
    Zero,
    /// Leave it: the target's backing file supplies it (or it is already zero).
    Skip,
}

#[derive(Debug, Clone, Copy)]
struct Item {
    /// Source index.
    src: usize,
    /// Offset within the source.
    offset: u64,
    /// Offset within the target.
    target_offset: u64,
    len: u64,
    kind: Kind,
}

struct Source {
    img: Arc<dyn FormatDriver>,
    chain: Vec<Arc<dyn FormatDriver>>,
    base: u64,
}

struct Scanner {
    src: usize,
    offset: u64,
    seq: u64,
    /// The last block-status answer, as (source, end, zero, data or present): one
    /// query covers a whole extent, which items then take in pieces of at most
    /// BUF_SIZE. Asking again for every piece would rescan the rest of the extent
    /// each time.
    extent: Option<(usize, u64, bool, bool)>,
}

/// Keeps target writes in source order (qemu-img's default without `-W`), so that a
/// qcow2 target gets its clusters allocated in guest order; reads still overlap.
struct Order {
    enabled: bool,
    next: Mutex<u64>,
    cv: Condvar,
    aborted: AtomicBool,
}

impl Order {
    fn wait(&self, seq: u64) -> CliResult<Option<MutexGuard<'_, u64>>> {
        if !self.enabled {
            return Ok(None);
        }
        let mut g = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while *g != seq {
            if self.aborted.load(Ordering::Relaxed) {
                return Err(CliError::msg("conversion aborted"));
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Ok(Some(g))
    }

    fn done(&self, g: Option<MutexGuard<'_, u64>>) {
        if let Some(mut g) = g {
            *g += 1;
            drop(g);
            self.cv.notify_all();
        }
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        let _g = self.next.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }
}

struct Job {
    sources: Vec<Source>,
    target: Arc<dyn FormatDriver>,
    /// Chain layers consulted for status (1 = top only, for -B).
    limit_top_only: bool,
    has_zero_init: bool,
    min_sparse: u64,
    compress: bool,
    cluster: u64,
    may_unmap: bool,
    order: Order,
}

impl Job {
    /// The size of each worker's buffer: no item is longer (a data item is at most
    /// BUF_SIZE or, when compressing, one target cluster).
    fn buf_len(&self) -> usize {
        BUF_SIZE.max(self.cluster) as usize
    }

    fn next_item(&self, sc: &mut Scanner) -> CliResult<Option<Item>> {
        loop {
            let Some(s) = self.sources.get(sc.src) else {
                return Ok(None);
            };
            let size = s.img.size();
            if sc.offset >= size {
                sc.src += 1;
                sc.offset = 0;
                continue;
            }
            let limit = if self.limit_top_only {
                1
            } else {
                s.chain.len()
            };
            let remaining = size - sc.offset;
            let (ext_end, zero, data) = match sc.extent {
                Some((src, end, zero, data)) if src == sc.src && sc.offset < end => {
                    (end, zero, data)
                }
                _ => {
                    let st = chain_status(&s.chain, limit, sc.offset, remaining)?;
                    let end = sc.offset + st.len.clamp(1, remaining);
                    let e = (end, st.zero, st.data || st.present);
                    sc.extent = Some((sc.src, e.0, e.1, e.2));
                    e
                }
            };
            let mut kind = if zero {
                if self.min_sparse == 0 {
                    Kind::Data
                } else if self.has_zero_init {
                    Kind::Skip
                } else {
                    Kind::Zero
                }
            } else if data {
                Kind::Data
            } else if self.limit_top_only {
                Kind::Skip
            } else {
                Kind::Data
            };
            let mut len = ext_end - sc.offset;
            let toff = s.base + sc.offset;
            if self.compress {
                // Work in whole target clusters.
                let c = self.cluster;
                let start_in = toff % c;
                if start_in != 0 || (len < c && sc.offset + len < size) {
                    // A partial cluster: copy the whole cluster as data.
                    kind = Kind::Data;
                    len = (c - start_in).min(remaining);
                } else if kind != Kind::Data {
                    let whole = len / c * c;
                    len = if whole == 0 { len } else { whole };
                } else {
                    len = len.min(BUF_SIZE.max(c)) / c * c;
                    if len == 0 {
                        len = c.min(remaining);
                    }
                }
            } else if kind == Kind::Data {
                len = len.min(BUF_SIZE);
            }
            let item = Item {
                src: sc.src,
                offset: sc.offset,
                target_offset: toff,
                len,
                kind,
            };
            sc.offset += len;
            return Ok(Some(item));
        }
    }

    fn write_err(off: u64, e: impl std::fmt::Display) -> CliError {
        CliError::msg(format!("error while writing at byte {off}: {e}"))
    }

    fn zeroes(&self, off: u64, len: u64, buf: &mut [u8]) -> CliResult<()> {
        if self.min_sparse == 0 {
            // Fully allocate: write real zeroes.
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                buf[..n].fill(0);
                self.target
                    .write(&buf[..n], off + done)
                    .map_err(|e| Self::write_err(off + done, e))?;
                done += n as u64;
            }
            return Ok(());
        }
        self.target
            .write_zeroes(off, len, self.may_unmap)
            .map_err(|e| Self::write_err(off, e))
    }

    /// Copies one item through `buf` (at least [`Job::buf_len`] bytes).
    fn run_item(&self, it: &Item, seq: u64, buf: &mut [u8]) -> CliResult<()> {
        if it.kind == Kind::Data {
            let n = it.len as usize;
            self.sources[it.src]
                .img
                .read(&mut buf[..n], it.offset)
                .map_err(|e| {
                    CliError::msg(format!(
                        "error while reading at byte {}: {e}",
                        it.target_offset
                    ))
                })?;
        }
        let turn = self.order.wait(seq)?;
        let res = self.write_item(it, buf);
        if res.is_ok() {
            self.order.done(turn);
        }
        res
    }

    fn write_item(&self, it: &Item, buf: &mut [u8]) -> CliResult<()> {
        match it.kind {
            Kind::Skip => Ok(()),
            Kind::Zero => self.zeroes(it.target_offset, it.len, buf),
            Kind::Data => {
                let data = &buf[..it.len as usize];
                if self.compress {
                    return self.write_compressed(it.target_offset, data);
                }
                if self.min_sparse == 0 {
                    return self
                        .target
                        .write(data, it.target_offset)
                        .map_err(|e| Self::write_err(it.target_offset, e));
                }
                self.write_sparse(it.target_offset, data)
            }
        }
    }

    fn write_compressed(&self, off: u64, data: &[u8]) -> CliResult<()> {
        let c = self.cluster as usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let end = (pos + c).min(data.len());
            let chunk = &data[pos..end];
            let at = off + pos as u64;
            if is_zero(chunk) {
                if !self.has_zero_init {
                    self.target
                        .write_zeroes(at, chunk.len() as u64, self.may_unmap)
                        .map_err(|e| Self::write_err(at, e))?;
                }
            } else if at % self.cluster == 0
                && (chunk.len() == c || at + chunk.len() as u64 == self.target.size())
            {
                self.target
                    .write_compressed(chunk, at)
                    .map_err(|e| Self::write_err(at, e))?;
            } else {
                self.target
                    .write(chunk, at)
                    .map_err(|e| Self::write_err(at, e))?;
            }
            pos = end;
        }
        Ok(())
    }

    fn write_sparse(&self, off: u64, data: &[u8]) -> CliResult<()> {
        let g = self.min_sparse;
        let mut pos = 0usize;
        while pos < data.len() {
            // Blocks aligned to `g` in target coordinates.
            let at = off + pos as u64;
            let blk_end = ((at / g + 1) * g - off) as usize;
            let end = blk_end.min(data.len());
            let zero = is_zero(&data[pos..end]) && (end - pos) as u64 == g;
            // Extend the run while blocks share the same zero-ness.
            let mut run_end = end;
            while run_end < data.len() {
                let next_end = (run_end + g as usize).min(data.len());
                let z = is_zero(&data[run_end..next_end]) && (next_end - run_end) as u64 == g;
                if z != zero {
                    break;
                }
                run_end = next_end;
            }
            if zero {
                if !self.has_zero_init {
                    self.target
                        .write_zeroes(at, (run_end - pos) as u64, self.may_unmap)
                        .map_err(|e| Self::write_err(at, e))?;
                }
            } else {
                self.target
                    .write(&data[pos..run_end], at)
                    .map_err(|e| Self::write_err(at, e))?;
            }
            pos = run_end;
        }
        Ok(())
    }
}

/// Runs `convert`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = (args.force_share, args.out_of_order, args.copy_offload);
    let out_fmt_name = args.out_format.as_deref().unwrap_or("raw");
    let out_format = Format::parse(out_fmt_name)
        .map_err(|_| CliError::msg(format!("Unknown file format '{out_fmt_name}'")))?;
    let pairs = join_opts(&args.options);
    if wants_help(&pairs) {
        print_option_help(out_format);
        return Ok(0);
    }
    if args.files.len() < 2 {
        return Err(CliError::msg("Must specify image file name"));
    }
    let (srcs, out) = args.files.split_at(args.files.len() - 1);
    let out_name = &out[0];
    let min_sparse = match &args.sparse {
        None => 4096,
        Some(s) => match parse_size(s) {
            Some(v) if v % 512 == 0 && v <= 32 << 20 => v,
            _ => {
                return Err(CliError::msg(format!(
                    "Invalid buffer size for sparse output specified: '{s}'."
                )))
            }
        },
    };
    if args.target_is_zero && !args.no_create {
        return Err(CliError::msg("--target-is-zero requires use of -n flag"));
    }
    if args.compress && out_format != Format::Qcow2 {
        return Err(CliError::msg(
            "Compression not supported for this file format",
        ));
    }
    let target_cache = parse_cache(args.cache.as_deref(), CacheMode::Unsafe)?;
    let src_cache = parse_cache(args.src_cache.as_deref(), CacheMode::Writeback)?;
    let workers = match args.workers.as_deref() {
        None => 8,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => {
                return Err(CliError::msg(
                    "Invalid number of coroutines specified. Must be between 1 and 16.",
                ))
            }
        },
    };

    let mut sources = Vec::new();
    let mut total = 0u64;
    for s in srcs {
        let img = open(
            s,
            &OpenArgs {
                format: args.format.as_deref(),
                cache: src_cache,
                ..Default::default()
            },
        )?;
        let size = img.size();
        sources.push(Source {
            chain: layers(&img),
            img,
            base: total,
        });
        total += size;
    }

    let mut popts = parse_create_opts(out_format, &pairs)?;
    if let Some(b) = &args.backing {
        popts.create.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_fmt {
        popts.create.backing_fmt = Some(f.clone());
    }
    let has_backing = popts.create.backing_file.is_some();
    if has_backing && popts.create.backing_fmt.is_none() && !args.no_create {
        return Err(CliError::msg(
            "Use of backing file requires explicit backing format",
        ));
    }
    if has_backing && popts.create.backing_fmt.is_none() {
        // Probe the backing file's format.
        let b = popts.create.backing_file.clone().unwrap_or_default();
        let bpath = resolve_backing_path(Path::new(out_name), &b);
        let bimg = open(&bpath.display().to_string(), &OpenArgs::default())?;
        popts.create.backing_fmt = Some(bimg.format_name().to_string());
    }
    if !args.no_create {
        if popts.create.size.is_none() {
            popts.create.size = Some(total);
        }
        validate(out_format, &popts).map_err(|e| e.context(out_name))?;
        crate::image::create_file(out_name, out_format, &popts.create)?;
    }
    let target = open(
        out_name,
        &OpenArgs {
            format: Some(out_format.name()),
            writable: true,
            cache: target_cache,
            backing: if has_backing {
                BackingChoice::FromImage
            } else {
                BackingChoice::None
            },
        },
    )?;
    if args.no_create && target.size() < total {
        return Err(CliError::msg("output file is smaller than input file"));
    }
    let cluster = target.cluster_size().unwrap_or(65536).max(512);
    let job = Job {
        sources,
        target: target.clone(),
        limit_top_only: has_backing,
        has_zero_init: (args.target_is_zero && !has_backing)
            || !args.no_create
                && !has_backing
                && popts.create.preallocation == strata_image::Preallocation::Off,
        min_sparse,
        compress: args.compress,
        cluster,
        may_unmap: !args.no_create,
        order: Order {
            enabled: !args.out_of_order,
            next: Mutex::new(0),
            cv: Condvar::new(),
            aborted: AtomicBool::new(false),
        },
    };
    let scanner = Mutex::new(Scanner {
        src: 0,
        offset: 0,
        seq: 0,
        extent: None,
    });
    let progress = Mutex::new(Progress::new(args.progress && !args.quiet));
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<CliError>> = Mutex::new(None);
    // `-m` requests in flight, one thread each, except that through the page cache
    // on both sides a copy is CPU work (two memory copies): threads beyond the CPU
    // count then only take CPU from the in-order writer to read far ahead. On 2 CPUs,
    // 1 GiB in the page cache: 8 threads 0.33 s, 2 threads 0.26 s; from a cold cache
    // (the kernel's readahead still runs ahead) 0.54 s and 0.58 s.
    let threads = if src_cache.direct() || target_cache.direct() {
        workers
    } else {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        workers.min(cpus.max(2))
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                // Huge pages spare the TLB misses of copying 2 MiB at a time through
                // 4 KiB pages (and give direct I/O one segment per request).
                let mut buf = AlignedBuf::huge(job.buf_len());
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let item = {
                        let mut sc = scanner.lock().unwrap_or_else(|p| p.into_inner());
                        let seq = sc.seq;
                        sc.seq += 1;
                        job.next_item(&mut sc).map(|o| o.map(|it| (it, seq)))
                    };
                    let res = match item {
                        Ok(Some((it, seq))) => job.run_item(&it, seq, &mut buf).map(|_| it.len),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(n) => {
                            let d = done.fetch_add(n, Ordering::Relaxed) + n;
                            if let Ok(mut p) = progress.lock() {
                                p.update(d, total);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                            if slot.is_none() {
                                *slot = Some(e);
                            }
                            drop(slot);
                            job.order.abort();
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let _ = target.close();
        return Err(e);
    }
    target.close()?;
    progress
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .finish();
    Ok(0)
}
