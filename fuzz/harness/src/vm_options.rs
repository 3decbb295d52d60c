//! `vm_options`: strata-vm's command-line option parsers.
//!
//! The first byte picks the parser (`--drive`, `--device`, `-m`, `--smp`, `--serial`,
//! `--qmp`), the rest is the option string. Invariants: bad options get an error,
//! never a panic; a parsed `--drive` yields `blockdev-add` options that the block
//! layer's parser takes or refuses with an error; no file is touched (format probing
//! is replaced).

use strata_block::options::BlockdevOptions;
use strata_vm::cli;

/// The `vm_options` target: see the module documentation.
pub fn vm_options(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => {
            if let Ok(d) = cli::parse_drive_with(&s, 0, |_| "raw".to_string()) {
                let _ = BlockdevOptions::from_json(&d.node);
            }
        }
        1 => {
            let _ = cli::parse_device(&s, 0);
        }
        2 => {
            let _ = cli::parse_memory(&s);
        }
        3 => {
            let _ = cli::parse_smp(&s);
        }
        4 => {
            let _ = cli::parse_serial(&s);
        }
        _ => {
            let _ = cli::parse_qmp(&s);
        }
    }
}
