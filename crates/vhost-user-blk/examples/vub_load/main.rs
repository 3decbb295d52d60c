//! `vub_load`: a vhost-user-blk load generator. It plays the frontend (the VMM) on
//! any vhost-user-blk backend socket: shared guest memory in a memfd, a real split
//! virtqueue, kick and call eventfds. Then it keeps `--qd` requests of `--bs` bytes
//! in flight for `--seconds` and prints one JSON line with IOPS and MiB/s.
//!
//! Used by `tests/perf/vhost_user_blk.sh` to compare strata-storage-daemon with
//! qemu-storage-daemon on the same image. `--hostile` sends malformed chains instead,
//! and `--probe` takes single requests from standard input (see `probe.rs`).

mod probe;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk load generator")]
struct Args {
    /// Backend socket.
    #[arg(long)]
    socket: String,
    /// randread, randwrite, read or write.
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Request size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    qd: u16,
    /// Run time.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Only touch the first SPAN bytes of the disk (0: all of it).
    #[arg(long, default_value_t = 0)]
    span: u64,
    /// Instead of a load, send malformed chains one by one, then a good read, and
    /// check each answer (exit status 0 when the backend answered as the spec says).
    #[arg(long)]
    hostile: bool,
    /// Instead of a load, read commands from standard input and print each answer
    /// (`w SECTOR BYTE`, `r SECTOR`, `wait MS`; see probe.rs).
    #[arg(long)]
    probe: bool,
}

pub(crate) const QSIZE: u16 = 256;
pub(crate) const DESC: u64 = 0;
pub(crate) const AVAIL: u64 = 0x1000;
pub(crate) const USED: u64 = 0x2000;
pub(crate) const HDR: u64 = 0x10_0000;
pub(crate) const STATUS: u64 = 0x18_0000;
pub(crate) const DATA: u64 = 0x20_0000;
const VERSION_1: u64 = 1 << 32;

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("vub_load: {e}");
        std::process::exit(1);
    }
}

/// Waits for the backend's notification. The backend may have made the shared
/// eventfd non-blocking, so poll first.
fn wait_call(call: &EventFd) -> Result<(), String> {
    loop {
        match call.read() {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(call),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    let qd = a.qd.clamp(1, QSIZE / 3);
    let mem_size = DATA + u64::from(qd) * a.bs;
    let mem_size = mem_size.next_multiple_of(2 << 20);
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vub-load".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err("memfd_create failed".into());
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size).map_err(|e| e.to_string())?;
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        mem_size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| format!("guest memory: {e}"))?;
    let regions: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("region: {e}"))?;

    let mut fe = Frontend::connect(&a.socket, 1).map_err(|e| format!("connect: {e}"))?;
    fe.set_owner().map_err(|e| format!("set_owner: {e}"))?;
    let offered = fe.get_features().map_err(|e| e.to_string())?;
    let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    fe.set_features(offered & (VERSION_1 | proto_bit))
        .map_err(|e| e.to_string())?;
    let pf = fe.get_protocol_features().map_err(|e| e.to_string())?;
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
    )
    .map_err(|e| e.to_string())?;
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .map_err(|e| format!("get_config: {e}"))?;
    let capacity = u64::from_le_bytes(cfg[..8].try_into().map_err(|_| "short config")?) * 512;
    fe.set_mem_table(&regions)
        .map_err(|e| format!("set_mem_table: {e}"))?;
    // Ring addresses are frontend virtual addresses in vhost-user.
    let hva = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())? as u64;
    let call = EventFd::new(0).map_err(|e| e.to_string())?;
    let kick = EventFd::new(0).map_err(|e| e.to_string())?;
    fe.set_vring_num(0, QSIZE).map_err(|e| e.to_string())?;
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: hva + DESC,
            used_ring_addr: hva + USED,
            avail_ring_addr: hva + AVAIL,
            log_addr: None,
        },
    )
    .map_err(|e| e.to_string())?;
    fe.set_vring_base(0, 0).map_err(|e| e.to_string())?;
    fe.set_vring_call(0, &call).map_err(|e| e.to_string())?;
    fe.set_vring_kick(0, &kick).map_err(|e| e.to_string())?;
    fe.set_vring_enable(0, true).map_err(|e| e.to_string())?;

    if a.hostile {
        return hostile(&mem, &kick, &call, capacity);
    }
    if a.probe {
        return probe::run(&mem, &kick, &call, qd, a.bs);
    }
    let span = if a.span == 0 {
        capacity
    } else {
        a.span.min(capacity)
    };
    let blocks = span / a.bs;
    if blocks == 0 {
        return Err("disk smaller than one request".into());
    }
    let (ty, random) = match a.rw.as_str() {
        "randread" => (0u32, true),
        "randwrite" => (1, true),
        "read" => (0, false),
        "write" => (1, false),
        other => return Err(format!("unknown --rw {other}")),
    };
    let put = |addr: u64, v: &[u8]| mem.write_slice(v, GuestAddress(addr));
    // Descriptor chains: slot i uses descriptors 3i (header), 3i+1 (data), 3i+2 (status).
    for i in 0..u64::from(qd) {
        let data_flags: u16 = if ty == 0 { 1 | 2 } else { 1 };
        let descs = [
            (HDR + 16 * i, 16u32, 1u16, (3 * i + 1) as u16),
            (DATA + a.bs * i, a.bs as u32, data_flags, (3 * i + 2) as u16),
            (STATUS + i, 1, 2, 0),
        ];
        for (j, (addr, len, flags, next)) in descs.iter().enumerate() {
            let at = DESC + 16 * (3 * i + j as u64);
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            put(at, &d).map_err(|e| e.to_string())?;
        }
        if ty == 1 {
            let fill: Vec<u8> = (0..a.bs).map(|x| (x as u8) ^ (i as u8) ^ 0x5a).collect();
            put(DATA + a.bs * i, &fill).map_err(|e| e.to_string())?;
        }
    }
    let mut rng = rand::thread_rng();
    let mut seq = 0u64;
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let mut submit = |slot: u64, avail_idx: &mut u16| -> Result<(), String> {
        let blk = if random {
            rng.gen_range(0..blocks)
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&(blk * a.bs / 512).to_le_bytes());
        put(HDR + 16 * slot, &h).map_err(|e| e.to_string())?;
        put(STATUS + slot, &[0xff]).map_err(|e| e.to_string())?;
        let ring = AVAIL + 4 + 2 * u64::from(*avail_idx % QSIZE);
        put(ring, &((3 * slot) as u16).to_le_bytes()).map_err(|e| e.to_string())?;
        fence(Ordering::Release);
        *avail_idx = avail_idx.wrapping_add(1);
        mem.store(*avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .map_err(|e| e.to_string())
    };
    for slot in 0..u64::from(qd) {
        submit(slot, &mut avail_idx)?;
    }
    kick.write(1).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(a.seconds);
    let mut done = 0u64;
    let mut errors = 0u64;
    let mut outstanding = u64::from(qd);
    while outstanding > 0 {
        wait_call(&call)?;
        let used_idx: u16 = mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .map_err(|e| e.to_string())?;
        let stopping = start.elapsed() >= deadline;
        let mut resubmitted = false;
        while used_seen != used_idx {
            let at = USED + 4 + 8 * u64::from(used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).map_err(|e| e.to_string())?;
            used_seen = used_seen.wrapping_add(1);
            let slot = u64::from(id) / 3;
            let st: u8 = mem
                .read_obj(GuestAddress(STATUS + slot))
                .map_err(|e| e.to_string())?;
            if st != 0 {
                errors += 1;
            }
            done += 1;
            outstanding -= 1;
            if !stopping {
                submit(slot, &mut avail_idx)?;
                outstanding += 1;
                resubmitted = true;
            }
        }
        if resubmitted {
            kick.write(1).map_err(|e| e.to_string())?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = done as f64 / secs;
    println!(
        "{}",
        serde_json::json!({
            "rw": a.rw, "bs": a.bs, "qd": qd, "seconds": secs, "requests": done,
            "errors": errors, "iops": iops.round(),
            "mib_s": (iops * a.bs as f64 / 1048576.0 * 10.0).round() / 10.0,
        })
    );
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}

/// One descriptor: (address, length, flags, next).
type Desc = (u64, u32, u16, u16);

/// A hostile case: name, request type, sector, chain, expected used length, expected
/// status (when the length is not 0).
type Case = (&'static str, u32, u64, Vec<Desc>, u32, u8);

/// Sends malformed chains through the real vring and checks the answers: the backend
/// must return every chain (status IOERR/UNSUPP, or length 0 when it has no usable
/// status byte) and keep serving.
fn hostile(
    mem: &GuestMemoryMmap,
    kick: &EventFd,
    call: &EventFd,
    capacity: u64,
) -> Result<(), String> {
    let e = |e: vm_memory::GuestMemoryError| e.to_string();
    let mem_end = mem.last_addr().0 + 1;
    let header = |ty: u32, sector: u64| -> Result<(), String> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).map_err(e)?;
        mem.write_slice(&[0xff], GuestAddress(STATUS)).map_err(e)
    };
    const N: u16 = 1;
    const W: u16 = 2;
    // (name, type, sector, chain, expected used length, expected status if len > 0)
    let cases: Vec<Case> = vec![
        (
            "data outside memory",
            0,
            0,
            vec![
                (HDR, 16, N, 1),
                (mem_end + 4096, 512, N | W, 2),
                (STATUS, 1, W, 0),
            ],
            1,
            1,
        ),
        (
            "data straddling the end of memory",
            0,
            0,
            vec![
                (HDR, 16, N, 1),
                (mem_end - 256, 512, N | W, 2),
                (STATUS, 1, W, 0),
            ],
            1,
            1,
        ),
        (
            "descriptor loop",
            0,
            0,
            vec![(HDR, 16, N, 1), (DATA, 512, N | W, 0)],
            0,
            0,
        ),
        (
            "next outside the table",
            0,
            0,
            vec![(HDR, 16, N, 300)],
            0,
            0,
        ),
        (
            "status outside memory",
            0,
            0,
            vec![(HDR, 16, N, 1), (mem_end + 8, 1, W, 0)],
            0,
            0,
        ),
        (
            "no status descriptor",
            1,
            0,
            vec![(HDR, 16, N, 1), (DATA, 512, 0, 0)],
            0,
            0,
        ),
        (
            "short header",
            0,
            0,
            vec![(HDR, 8, N, 1), (STATUS, 1, W, 0)],
            1,
            1,
        ),
        (
            "sector beyond capacity",
            0,
            capacity / 512,
            vec![(HDR, 16, N, 1), (DATA, 512, N | W, 2), (STATUS, 1, W, 0)],
            1,
            1,
        ),
        (
            "unsupported type",
            0x77,
            0,
            vec![(HDR, 16, N, 1), (STATUS, 1, W, 0)],
            1,
            2,
        ),
        (
            "huge length",
            0,
            0,
            vec![
                (HDR, 16, N, 1),
                (DATA, u32::MAX - 64, N | W, 2),
                (STATUS, 1, W, 0),
            ],
            1,
            1,
        ),
        (
            "good read",
            0,
            0,
            vec![(HDR, 16, N, 1), (DATA, 4096, N | W, 2), (STATUS, 1, W, 0)],
            4097,
            0,
        ),
    ];
    let mut avail_idx: u16 = 0;
    let mut failures = Vec::new();
    for (name, ty, sector, chain, want_len, want_status) in cases {
        header(ty, sector)?;
        for (i, (addr, len, flags, next)) in chain.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(DESC + 16 * i as u64))
                .map_err(e)?;
        }
        let ring = AVAIL + 4 + 2 * u64::from(avail_idx % QSIZE);
        mem.write_slice(&0u16.to_le_bytes(), GuestAddress(ring))
            .map_err(e)?;
        fence(Ordering::Release);
        avail_idx = avail_idx.wrapping_add(1);
        mem.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .map_err(e)?;
        kick.write(1).map_err(|e| e.to_string())?;
        let t = Instant::now();
        loop {
            let used: u16 = mem
                .load(GuestAddress(USED + 2), Ordering::Acquire)
                .map_err(e)?;
            if used == avail_idx {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{name}: the chain was never returned"));
            }
            let _ = wait_call_timeout(call);
        }
        let at = USED + 4 + 8 * u64::from((avail_idx.wrapping_sub(1)) % QSIZE);
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).map_err(e)?;
        let st: u8 = mem.read_obj(GuestAddress(STATUS)).map_err(e)?;
        let ok = len == want_len && (len == 0 || st == want_status);
        println!(
            "{}",
            serde_json::json!({"case": name, "len": len, "status": st, "ok": ok})
        );
        if !ok {
            failures.push(name);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected answers: {failures:?}"))
    }
}

/// Waits up to 100 ms for a notification.
pub(crate) fn wait_call_timeout(call: &EventFd) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(call),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, 100) };
    // Read only when readable: the eventfd may be blocking.
    if n <= 0 || p.revents & libc::POLLIN == 0 {
        return Ok(());
    }
    match call.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}
