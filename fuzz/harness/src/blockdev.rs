//! `blockdev_options`: the `--blockdev` / `blockdev-add` option parser.
//!
//! The input is one option string, tried both ways the storage daemon accepts it: as
//! QEMU's key=value syntax (`driver=qcow2,file.driver=file,file.filename=a,,b`) and,
//! when it is JSON, as a JSON object. Sizes go through `parse_size` too. The invariant
//! is the design card's: bad options get an error, never a panic; and the key=value
//! form, once split into a JSON tree, parses exactly as that tree does in key=value mode.

use strata_block::options::{keyval_to_json, parse_size, BlockdevOptions};

/// The `blockdev_options` target: see the module documentation.
pub fn blockdev_options(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = parse_size(&s);
    let parts = strata_image::split_options(&s);
    assert!(!parts.is_empty(), "splitting options gave nothing at all");
    let keyval = BlockdevOptions::from_keyval(&s);
    if keyval_to_json(&s).is_err() {
        assert!(
            keyval.is_err(),
            "options that do not split into a tree parsed anyway"
        );
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = BlockdevOptions::from_json(&v);
    }
}
