//! The QMP targets' seed inputs (`fuzz/corpus-seeds/qmp_session`, `.../qmp_commands`)
//! pass their invariants: the transcripts are valid sessions, so a failure here is a
//! bug in the monitor or in the harness, found without a fuzzer.

use std::fs;
use std::path::Path;

#[test]
fn qmp_seeds_pass() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("corpus-seeds");
    let mut n = 0;
    for (target, run) in [
        ("qmp_session", strata_fuzz_harness::qmp_session as fn(&[u8])),
        ("qmp_commands", strata_fuzz_harness::qmp_commands),
    ] {
        let mut files: Vec<_> = fs::read_dir(seeds.join(target))
            .expect("seed directory")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let t0 = std::time::Instant::now();
            run(&fs::read(&f).expect("seed"));
            eprintln!("{}: {:?}", f.display(), t0.elapsed());
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} seeds");
}
