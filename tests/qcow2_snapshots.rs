//! Internal snapshots made, applied and deleted by `strata-img snapshot` and by
//! `qemu-img snapshot` on the same images, in any mix.
//!
//! For each image configuration a seeded sequence of qemu-io writes (patterns,
//! zeroes, discards, compressed clusters) is interleaved with snapshot create / apply /
//! delete, each done by a tool chosen at random. The test keeps the expected contents
//! of the active disk and of every snapshot. After every snapshot operation
//! `qemu-img check` must find no errors and no leaks, `qemu-img snapshot -l` must list
//! exactly the expected snapshots, and the active disk must equal its model; at the
//! end `qemu-img convert -l snapshot.id=ID` must give every snapshot's contents.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_tests::{assert_same_disk, qemu, require_qemu, s, seed, strata_img_bin, tempdir};

/// One configuration: `qemu-img create -o` options, and how big the disk is.
struct Config {
    name: &'static str,
    opts: &'static str,
    cluster: u64,
    size: u64,
    steps: usize,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "default",
        opts: "",
        cluster: 65536,
        size: 8 << 20,
        steps: 60,
    },
    Config {
        name: "compat 0.10, 4k clusters",
        opts: "compat=0.10,cluster_size=4096",
        cluster: 4096,
        size: 2 << 20,
        steps: 40,
    },
    Config {
        name: "extended L2, 64-bit refcounts",
        opts: "extended_l2=on,cluster_size=65536,refcount_bits=64",
        cluster: 65536,
        size: 8 << 20,
        steps: 40,
    },
    Config {
        name: "512-byte clusters, zstd",
        opts: "cluster_size=512,compression_type=zstd",
        cluster: 512,
        size: 1 << 20,
        steps: 40,
    },
    Config {
        name: "2 MiB clusters, lazy refcounts",
        opts: "cluster_size=2M,lazy_refcounts=on",
        cluster: 2 << 20,
        size: 16 << 20,
        steps: 20,
    },
];

fn strata(args: &[&str]) -> qemu::Out {
    qemu::run(s(&strata_img_bin()), args)
}

/// Runs `snapshot <args>` with strata-img or qemu-img; it must succeed.
fn snapshot(use_strata: bool, args: &[&str]) {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    if use_strata {
        strata(&all).ok();
    } else {
        qemu::img(&all).ok();
    }
}

fn check_clean(image: &Path, what: &str) {
    let out = qemu::check(image);
    assert!(
        out.code == 0,
        "{what}: qemu-img check found problems (exit {}):\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
}

/// The snapshots as `qemu-img snapshot -l` lists them: (id, name).
fn listed(image: &Path) -> Vec<(String, String)> {
    let out = qemu::img(&["snapshot", "-l", s(image)]).ok();
    out.stdout
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The disk as QEMU reads it, in the active state or in snapshot `id`.
fn contents(image: &Path, id: Option<&str>) -> Vec<u8> {
    let dir = tempdir();
    let raw = dir.path().join("out.raw");
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let sel;
    if let Some(id) = id {
        sel = format!("snapshot.id={id}");
        args.extend(["-l", &sel]);
    }
    args.extend([s(image), s(&raw)]);
    qemu::img(&args).ok();
    std::fs::read(&raw).expect("read converted image")
}

fn run(cfg: &Config, seed: u64) {
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    qemu::create(&image, "qcow2", cfg.opts, &cfg.size.to_string());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; cfg.size as usize];
    // (id, name, contents)
    let mut snaps: Vec<(String, String, Vec<u8>)> = Vec::new();
    let cs = cfg.cluster;
    let what = |step: usize, op: &str| format!("{} (seed {seed}) step {step}: {op}", cfg.name);
    for step in 0..cfg.steps {
        let by_strata = rng.gen_bool(0.5);
        let tool = if by_strata { "strata-img" } else { "qemu-img" };
        match rng.gen_range(0..10) {
            0..=3 => {
                let len = rng.gen_range(1..=4 * cs.min(65536));
                let off = rng.gen_range(0..cfg.size - len);
                let byte = (step % 250 + 1) as u8;
                qemu::io("qcow2", &image, &[&format!("write -P {byte} {off} {len}")]);
                model[off as usize..(off + len) as usize].fill(byte);
            }
            4 => {
                let c = rng.gen_range(0..cfg.size / cs - 2);
                let n = rng.gen_range(1..=2);
                qemu::io(
                    "qcow2",
                    &image,
                    &[&format!("write -z -u {} {}", c * cs, n * cs)],
                );
                model[(c * cs) as usize..((c + n) * cs) as usize].fill(0);
            }
            5 => {
                let c = rng.gen_range(0..cfg.size / cs);
                let byte = (step % 250 + 1) as u8;
                qemu::io(
                    "qcow2",
                    &image,
                    // QEMU compresses only into clusters with nothing allocated.
                    &[
                        &format!("discard {} {cs}", c * cs),
                        &format!("write -c -P {byte} {} {cs}", c * cs),
                    ],
                );
                model[(c * cs) as usize..((c + 1) * cs) as usize].fill(byte);
            }
            6..=7 => {
                let name = format!("snap-{step}");
                snapshot(by_strata, &["-c", &name, s(&image)]);
                let id = listed(&image)
                    .into_iter()
                    .find(|(_, n)| *n == name)
                    .map(|(id, _)| id)
                    .unwrap_or_else(|| panic!("{}: not listed", what(step, "create")));
                snaps.push((id, name, model.clone()));
                check_clean(&image, &what(step, &format!("{tool} snapshot -c")));
            }
            8 if !snaps.is_empty() => {
                let (id, _, c) = snaps[rng.gen_range(0..snaps.len())].clone();
                snapshot(by_strata, &["-a", &id, s(&image)]);
                model = c;
                check_clean(&image, &what(step, &format!("{tool} snapshot -a {id}")));
            }
            9 if !snaps.is_empty() => {
                let (_, name, _) = snaps.remove(rng.gen_range(0..snaps.len()));
                snapshot(by_strata, &["-d", &name, s(&image)]);
                check_clean(&image, &what(step, &format!("{tool} snapshot -d {name}")));
            }
            _ => continue,
        }
        let want: Vec<(String, String)> = snaps
            .iter()
            .map(|(id, name, _)| (id.clone(), name.clone()))
            .collect();
        assert_eq!(listed(&image), want, "{}", what(step, "snapshot list"));
        assert_same_disk(&what(step, "active disk"), &contents(&image, None), &model);
    }
    for (id, name, c) in &snaps {
        assert_same_disk(
            &format!("{}: snapshot {id} ({name})", cfg.name),
            &contents(&image, Some(id)),
            c,
        );
    }
}

#[test]
fn snapshots_made_applied_and_deleted_by_either_tool() {
    require_qemu!();
    let base = seed("qcow2_snapshots");
    for (i, cfg) in CONFIGS.iter().enumerate() {
        run(cfg, base + i as u64);
    }
}

/// A snapshot of a smaller disk, applied after the disk grew, brings the old size back;
/// applying the later snapshot grows it again.
#[test]
fn apply_restores_the_snapshots_disk_size() {
    require_qemu!();
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    qemu::create(&image, "qcow2", "", "1M");
    qemu::io("qcow2", &image, &["write -P 7 0 64k"]);
    strata(&["snapshot", "-c", "small", s(&image)]).ok();
    qemu::img(&["resize", "-q", s(&image), "3M"]).ok();
    qemu::io("qcow2", &image, &["write -P 8 2M 64k"]);
    strata(&["snapshot", "-c", "big", s(&image)]).ok();
    strata(&["snapshot", "-a", "small", s(&image)]).ok();
    let info = qemu::img(&["info", "--output=json", s(&image)]).ok();
    assert!(
        info.stdout.contains("\"virtual-size\": 1048576"),
        "{}",
        info.stdout
    );
    check_clean(&image, "after applying the small snapshot");
    strata(&["snapshot", "-a", "big", s(&image)]).ok();
    qemu::io("qcow2", &image, &["read -P 7 0 64k", "read -P 8 2M 64k"]);
    check_clean(&image, "after applying the big snapshot");
}

/// Errors: each a one-line message with qemu-img's wording, exit code 1, and the image
/// unchanged (byte for byte).
#[test]
fn snapshot_errors_change_nothing() {
    require_qemu!();
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    // Refcounts of one bit cannot count a second reference.
    qemu::create(&image, "qcow2", "refcount_bits=1", "1M");
    qemu::io("qcow2", &image, &["write -P 1 0 64k"]);
    let before = std::fs::read(&image).unwrap();
    for (args, want) in [
        (
            vec!["-c", "x"],
            "Could not create snapshot 'x': Invalid argument",
        ),
        (
            vec!["-a", "nope"],
            "Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory",
        ),
        (
            vec!["-d", "nope"],
            "Could not delete snapshot 'nope': snapshot not found",
        ),
        (
            vec!["-c", "x", "-d", "y"],
            "Cannot mix '-l', '-a', '-c', '-d'",
        ),
    ] {
        let mut all = vec!["snapshot"];
        all.extend(args.iter().copied());
        all.push(s(&image));
        let out = strata(&all).expect_code(&[1]);
        assert!(
            out.stderr.starts_with(&format!("strata-img: {want}")),
            "`{}`: {}",
            out.cmdline,
            out.stderr
        );
        assert!(
            std::fs::read(&image).unwrap() == before,
            "`{}` changed the image",
            out.cmdline
        );
    }
    check_clean(&image, "after the refused operations");
    // A raw image has no internal snapshots.
    let raw = dir.path().join("disk.raw");
    qemu::create(&raw, "raw", "", "1M");
    let out = strata(&["snapshot", "-f", "raw", "-c", "x", s(&raw)]).expect_code(&[1]);
    assert!(
        out.stderr.contains("Could not create snapshot 'x'"),
        "{}",
        out.stderr
    );
}

/// One line of `qemu-img check` output after a kill: allowed or not. Allowed are
/// leaks, and a COPIED flag that is clear although the refcount is one (a reference
/// was being dropped; harmless: the next write copies the cluster once).
fn harmless(line: &str) -> bool {
    const COPIED: u64 = 1 << 63;
    let field = |key: &str| {
        line.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    let hex = |key: &str| field(key).and_then(|v| u64::from_str_radix(&v, 16).ok());
    if line.starts_with("ERROR OFLAG_COPIED data cluster:") {
        return field("refcount=").as_deref() == Some("1")
            && hex("l2_entry=").is_some_and(|e| e & COPIED == 0);
    }
    if line.starts_with("ERROR OFLAG_COPIED L2 cluster:") {
        return field("refcount=").as_deref() == Some("1")
            && hex("l1_entry=").is_some_and(|e| e & COPIED == 0);
    }
    // qemu-img's summary after any error; the errors themselves are judged above.
    if line.starts_with("Data may be corrupted, or further writes to the image may corrupt it") {
        return true;
    }
    !line.starts_with("ERROR") && !line.contains("corrupt")
}

/// `strata-img snapshot -c/-a/-d` killed with SIGKILL at random moments: afterwards
/// `qemu-img check` finds nothing but leaks and harmless COPIED flags, the snapshot
/// list is the one before or the one after the operation, every listed snapshot holds
/// its contents, and the active disk holds the contents before or after.
#[test]
fn snapshot_operations_killed_at_random_moments() {
    require_qemu!();
    let kills: usize = std::env::var("STRATA_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed = seed("qcow2_snapshot_kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    let size: u64 = 8 << 20;
    // Small clusters: several L2 tables and thousands of references to update.
    qemu::create(&image, "qcow2", "cluster_size=4096", &size.to_string());
    qemu::io("qcow2", &image, &[&format!("write -P 1 0 {size}")]);
    let mut model = vec![1u8; size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let bin = strata_img_bin();
    // How long an uninterrupted operation takes, to spread the kills over it.
    let t0 = std::time::Instant::now();
    strata(&["snapshot", "-c", "warmup", s(&image)]).ok();
    strata(&["snapshot", "-d", "warmup", s(&image)]).ok();
    let span = (t0.elapsed() / 2).max(std::time::Duration::from_millis(2));
    let mut outcomes = [0usize; 2];
    // Kills on a clean image that left leaks or flags to repair: they landed inside
    // an operation.
    let mut mid_operation = 0usize;
    let mut clean_before = true;
    for kill in 0..kills {
        let what = format!("kill {kill} (seed {seed})");
        // Change the active disk so that every state is distinguishable.
        let byte = (kill % 200 + 2) as u8;
        let off = rng.gen_range(0..size / 4096 - 64) * 4096;
        qemu::io("qcow2", &image, &[&format!("write -P {byte} {off} 256k")]);
        model[off as usize..(off + (256 << 10)) as usize].fill(byte);
        let op = match rng.gen_range(0..3) {
            0 if !snaps.is_empty() => 'a',
            1 if !snaps.is_empty() => 'd',
            _ => 'c',
        };
        let name = match op {
            'c' => format!("k{kill}"),
            _ => snaps[rng.gen_range(0..snaps.len())].0.clone(),
        };
        let before: Vec<String> = snaps.iter().map(|(n, _)| n.clone()).collect();
        let mut child = std::process::Command::new(&bin)
            .args(["snapshot", &format!("-{op}"), &name, s(&image)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start strata-img");
        std::thread::sleep(span.mul_f64(rng.gen_range(0.0..1.5)));
        let _ = child.kill();
        let finished = child.wait().expect("wait").success();
        let out = qemu::check(&image);
        let text = format!("{}{}", out.stdout, out.stderr);
        let bad: Vec<&str> = text.lines().filter(|l| !harmless(l)).collect();
        assert!(
            bad.is_empty() && [0, 2, 3].contains(&out.code),
            "{what}: `snapshot -{op} {name}` left: {bad:?}\n{text}"
        );
        if out.code != 0 && clean_before {
            mid_operation += 1;
        }
        // Half the time the next operation starts on the image as the kill left it,
        // half the time on a repaired one (which tells whether a kill hit mid-way).
        clean_before = rng.gen_bool(0.5);
        if clean_before && out.code != 0 {
            qemu::img(&["check", "-q", "-r", "all", s(&image)]);
            check_clean(&image, &format!("{what}: after check -r all"));
        }
        // Which snapshots exist now: the list before, or the list after.
        let names: Vec<String> = listed(&image).into_iter().map(|(_, n)| n).collect();
        let after: Vec<String> = match op {
            'c' => before.iter().cloned().chain([name.clone()]).collect(),
            'd' => before.iter().filter(|n| **n != name).cloned().collect(),
            _ => before.clone(),
        };
        let done = if names == after {
            true
        } else {
            assert_eq!(names, before, "{what}: snapshot list after `-{op} {name}`");
            false
        };
        assert!(
            !finished || done,
            "{what}: `-{op}` exited 0 but did not happen"
        );
        match (op, done) {
            ('c', true) => snaps.push((name.clone(), model.clone())),
            ('d', true) => snaps.retain(|(n, _)| *n != name),
            _ => {}
        }
        let active = contents(&image, None);
        if op == 'a' {
            let target = &snaps.iter().find(|(n, _)| *n == name).expect("listed").1;
            // Applied or not: either state, never a mix.
            let applied = active == *target;
            assert!(
                applied || active == model,
                "{what}: active disk after `-a {name}`"
            );
            if applied {
                model = target.clone();
            }
            outcomes[usize::from(applied)] += 1;
        } else {
            assert_same_disk(&format!("{what}: active disk"), &active, &model);
            outcomes[usize::from(done)] += 1;
        }
    }
    for (name, c) in &snaps {
        let id = listed(&image)
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| id)
            .expect("listed");
        assert_same_disk(&format!("snapshot {name}"), &contents(&image, Some(&id)), c);
    }
    eprintln!(
        "{kills} kills: {} operations interrupted, {} completed; {mid_operation} kills on a \
         clean image left leaks or flags to repair; {} snapshots at the end",
        outcomes[0],
        outcomes[1],
        snaps.len()
    );
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "the kills never interrupted an operation or never let one finish: {outcomes:?}"
    );
    // The repair that `check -r all` does leaves a clean image.
    qemu::img(&["check", "-q", "-r", "all", s(&image)]);
    check_clean(&image, "after check -r all");
}

/// Snapshots taken and deleted over QMP's block-graph path while writer threads keep
/// writing: every snapshot is one moment of every writer's sequence (the node is
/// drained while the image changes), and the image stays clean.
#[test]
fn live_snapshots_are_points_in_time_of_running_writers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    require_qemu!();
    const BLOCK: u64 = 65536;
    const WRITERS: u64 = 3;
    const PER_WRITER: u64 = 32;
    let dir = tempdir();
    let image = dir.path().join("live.qcow2");
    let size = WRITERS * PER_WRITER * BLOCK;
    qemu::create(&image, "qcow2", "cluster_size=4096", &size.to_string());
    let g = Arc::new(strata_block::BlockGraph::new());
    let opts = strata_block::BlockdevOptions::from_json(&serde_json::json!({
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "filename": s(&image)},
    }))
    .expect("options");
    g.blockdev_add(&opts).expect("blockdev-add");
    let node = g.node("q").expect("node");
    // The block each writer's n-th write went to.
    let logs: Arc<Vec<Mutex<Vec<u64>>>> =
        Arc::new((0..WRITERS).map(|_| Mutex::new(Vec::new())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let block_data = |w: u64, n: u64| {
        let mut b = vec![(w * 64 + n % 61) as u8 | 1; BLOCK as usize];
        b[..16].copy_from_slice(&[w.to_le_bytes(), (n + 1).to_le_bytes()].concat());
        b
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (node, logs, stop) = (node.clone(), logs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let b = w * PER_WRITER + rng.gen_range(0..PER_WRITER);
                    // Logged first: a snapshot can only hold logged writes.
                    logs[w as usize].lock().unwrap().push(b);
                    node.write(&block_data(w, n), b * BLOCK).expect("write");
                    n += 1;
                }
            })
        })
        .collect();
    let mut names = Vec::new();
    for i in 0..12 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let name = format!("live{i}");
        g.snapshot_internal("q", &name).expect("snapshot");
        names.push(name);
        if i % 4 == 3 {
            let gone = names.remove(0);
            g.snapshot_delete_internal("q", None, Some(&gone))
                .expect("delete");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.join().unwrap();
    }
    drop(node);
    assert!(g.close_all().is_empty(), "closing the graph failed");
    check_clean(&image, "after live snapshots");
    let logs: Vec<Vec<u64>> = logs.iter().map(|l| l.lock().unwrap().clone()).collect();
    let listed = listed(&image);
    assert_eq!(
        listed.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>(),
        names
    );
    for (id, name) in &listed {
        let disk = contents(&image, Some(id));
        for w in 0..WRITERS {
            // The newest write of this writer in the snapshot ...
            let upto = (w * PER_WRITER..(w + 1) * PER_WRITER)
                .map(|b| {
                    let o = (b * BLOCK) as usize;
                    u64::from_le_bytes(disk[o + 8..o + 16].try_into().unwrap())
                })
                .max()
                .unwrap_or(0);
            // ... and every block as the writer's first `upto` writes left it.
            let mut want: Vec<Option<u64>> = vec![None; PER_WRITER as usize];
            for (n, &b) in logs[w as usize].iter().enumerate().take(upto as usize) {
                want[(b - w * PER_WRITER) as usize] = Some(n as u64);
            }
            for (i, last) in want.iter().enumerate() {
                let o = ((w * PER_WRITER + i as u64) * BLOCK) as usize;
                let got = &disk[o..o + BLOCK as usize];
                let ok = match last {
                    Some(n) => got == block_data(w, *n).as_slice(),
                    None => got.iter().all(|&x| x == 0),
                };
                assert!(
                    ok,
                    "snapshot {id} ({name}): writer {w} block {i} is not what its first {upto} \
                     writes left there"
                );
            }
        }
    }
}
