//! `--probe`: single requests driven from standard input, one command per line, for
//! tests that must see what happens to each request (e.g. one held by
//! `werror=stop` until QMP `cont`):
//!
//! * `w SECTOR BYTE`: write `--bs` bytes of BYTE (decimal) at SECTOR; prints
//!   `{"slot": N}`.
//! * `r SECTOR`: read `--bs` bytes at SECTOR; prints `{"slot": N}`.
//! * `W SECTOR BYTE`, `R SECTOR`: the same without kicking the backend, so that
//!   several requests become available at once; `kick` then kicks (prints `{}`).
//! * `wait MS`: waits up to MS milliseconds for at least one answer, then prints
//!   `{"done": [{"slot", "sector", "status", "len", "byte"}...]}` with every answer so far
//!   (`byte`: the first data byte of the slot, the value read for a read).
//!
//! Up to `--qd` requests may be outstanding; slots are reused once answered.

use std::io::BufRead;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::{wait_call_timeout, AVAIL, DATA, DESC, HDR, QSIZE, STATUS, USED};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Runs the command loop until standard input ends.
pub fn run(
    mem: &GuestMemoryMmap,
    kick: &EventFd,
    call: &EventFd,
    qd: u16,
    bs: u64,
) -> Result<(), String> {
    let e = |e: vm_memory::GuestMemoryError| e.to_string();
    let mut free: Vec<u64> = (0..u64::from(qd)).rev().collect();
    let mut sectors = vec![0u64; usize::from(qd)];
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let bs32 = u32::try_from(bs).map_err(|_| "--bs too large")?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            w.get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad command {line:?}"))
        };
        match w.first().copied() {
            Some("kick") => {
                kick.write(1).map_err(|e| e.to_string())?;
                println!("{{}}");
            }
            Some(cmd @ ("w" | "r" | "W" | "R")) => {
                let write = cmd.eq_ignore_ascii_case("w");
                let kick_now = cmd == "w" || cmd == "r";
                let sector = num(1)?;
                let slot = free.pop().ok_or("no free slot (raise --qd)")?;
                sectors[slot as usize] = sector;
                if write {
                    let byte = num(2)? as u8;
                    mem.write_slice(&vec![byte; bs as usize], GuestAddress(DATA + bs * slot))
                        .map_err(e)?;
                }
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&h, GuestAddress(HDR + 16 * slot))
                    .map_err(e)?;
                mem.write_slice(&[0xff], GuestAddress(STATUS + slot))
                    .map_err(e)?;
                let data_flags = if write { NEXT } else { NEXT | WRITE };
                let descs = [
                    (HDR + 16 * slot, 16u32, NEXT, (3 * slot + 1) as u16),
                    (DATA + bs * slot, bs32, data_flags, (3 * slot + 2) as u16),
                    (STATUS + slot, 1, WRITE, 0),
                ];
                for (j, (addr, len, flags, next)) in descs.iter().enumerate() {
                    let mut d = [0u8; 16];
                    d[0..8].copy_from_slice(&addr.to_le_bytes());
                    d[8..12].copy_from_slice(&len.to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                    d[14..16].copy_from_slice(&next.to_le_bytes());
                    mem.write_slice(&d, GuestAddress(DESC + 16 * (3 * slot + j as u64)))
                        .map_err(e)?;
                }
                let ring = AVAIL + 4 + 2 * u64::from(avail_idx % QSIZE);
                mem.write_slice(&((3 * slot) as u16).to_le_bytes(), GuestAddress(ring))
                    .map_err(e)?;
                fence(Ordering::Release);
                avail_idx = avail_idx.wrapping_add(1);
                mem.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
                    .map_err(e)?;
                if kick_now {
                    kick.write(1).map_err(|e| e.to_string())?;
                }
                println!("{}", serde_json::json!({ "slot": slot }));
            }
            Some("wait") => {
                let limit = Duration::from_millis(num(1)?);
                let t = Instant::now();
                let mut done = Vec::new();
                loop {
                    let used: u16 = mem
                        .load(GuestAddress(USED + 2), Ordering::Acquire)
                        .map_err(e)?;
                    while used_seen != used {
                        let at = USED + 4 + 8 * u64::from(used_seen % QSIZE);
                        let id: u32 = mem.read_obj(GuestAddress(at)).map_err(e)?;
                        let len: u32 = mem.read_obj(GuestAddress(at + 4)).map_err(e)?;
                        used_seen = used_seen.wrapping_add(1);
                        let slot = u64::from(id) / 3;
                        let status: u8 = mem.read_obj(GuestAddress(STATUS + slot)).map_err(e)?;
                        let byte: u8 = mem.read_obj(GuestAddress(DATA + bs * slot)).map_err(e)?;
                        let sector = sectors.get(slot as usize).copied();
                        done.push(serde_json::json!({
                            "slot": slot, "sector": sector, "status": status, "len": len,
                            "byte": byte,
                        }));
                        free.push(slot);
                    }
                    if !done.is_empty() || t.elapsed() >= limit {
                        break;
                    }
                    wait_call_timeout(call).map_err(|e| e.to_string())?;
                }
                println!("{}", serde_json::json!({ "done": done }));
            }
            Some(other) => return Err(format!("unknown command {other:?}")),
            None => {}
        }
    }
    Ok(())
}
