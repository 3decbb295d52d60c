//! Block graph tests over real files: blockdev-add with inline and referenced
//! children, backing chains, bitmaps recording writes and persisting across close.

use serde_json::json;
use strata_block::{BitmapRef, BlockGraph, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};

fn qcow2(dir: &std::path::Path, name: &str, backing: Option<&str>) -> String {
    let p = dir.join(name);
    create_image(
        &p,
        Format::Qcow2,
        &CreateOptions {
            size: Some(8 << 20),
            backing_file: backing.map(str::to_string),
            backing_fmt: backing.map(|_| "qcow2".to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    p.display().to_string()
}

fn add(g: &BlockGraph, v: serde_json::Value) -> Result<(), String> {
    let o = BlockdevOptions::from_json(&v).map_err(|e| e.desc)?;
    g.blockdev_add(&o).map(|_| ()).map_err(|e| e.desc)
}

#[test]
fn persistent_bitmap_survives_close() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "a.qcow2", None);
    let g = BlockGraph::new();
    add(
        &g,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .unwrap();
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "q0", "file": "f0"}),
    )
    .unwrap();
    g.bitmap_add("q0", "b0", None, true, false).unwrap();
    g.bitmap_add("q0", "tmp", Some(4096), false, false).unwrap();
    let q0 = g.node("q0").unwrap();
    q0.write(&[1u8; 70_000], 1 << 20).unwrap();
    q0.write_zeroes(5 << 20, 512, false).unwrap();
    let sha = g.bitmap_sha256("q0", "b0").unwrap();
    let info = g.query_named_block_nodes(true);
    let bms = &info[0]["dirty-bitmaps"];
    assert_eq!(bms[0]["name"], "tmp");
    assert_eq!(bms[1]["name"], "b0");
    assert_eq!(bms[1]["count"], 3 * 65536);
    assert_eq!(bms[1]["persistent"], true);
    assert!(g.close_all().is_empty());

    let g = BlockGraph::new();
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "q0",
               "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
    assert_eq!(g.bitmap_sha256("q0", "b0").unwrap(), sha);
    assert!(g.node("q0").unwrap().bitmap("tmp").is_none());
    assert!(g.close_all().is_empty());
}

#[test]
fn qemu_error_texts() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "a.qcow2", None);
    let g = BlockGraph::new();
    add(
        &g,
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    )
    .unwrap();
    assert_eq!(
        add(
            &g,
            json!({"driver": "file", "node-name": "f0", "filename": img})
        ),
        Err("Duplicate nodes with node-name='f0'".into())
    );
    assert_eq!(
        add(&g, json!({"driver": "file", "filename": img})),
        Err("'node-name' must be specified for the root node".into())
    );
    assert_eq!(
        add(
            &g,
            json!({"driver": "file", "node-name": "9x", "filename": img})
        ),
        Err("Invalid node-name: '9x'".into())
    );
    assert_eq!(
        add(
            &g,
            json!({"driver": "qcow2", "node-name": "q", "file": "nonode"})
        ),
        Err("Cannot find device='nonode' nor node-name='nonode'".into())
    );
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "q0", "file": "f0"}),
    )
    .unwrap();
    assert_eq!(
        g.blockdev_del("f0").unwrap_err().desc,
        "Block device f0 is in use"
    );
    assert_eq!(
        g.blockdev_del("nope").unwrap_err().desc,
        "Failed to find node with node-name='nope'"
    );
    assert_eq!(
        g.bitmap_add("q0", "x", Some(1000), false, false)
            .unwrap_err()
            .desc,
        "Granularity must be power of 2 and at least 512"
    );
    g.bitmap_add("q0", "x", None, false, false).unwrap();
    assert_eq!(
        g.bitmap_add("q0", "x", None, false, false)
            .unwrap_err()
            .desc,
        "Bitmap already exists: x"
    );
    assert_eq!(
        g.bitmap_merge(
            "q0",
            "x",
            &[BitmapRef {
                node: "q0".into(),
                name: "nope".into()
            }]
        )
        .unwrap_err()
        .desc,
        "Dirty bitmap 'nope' not found"
    );
    g.blockdev_del("q0").unwrap();
    g.blockdev_del("f0").unwrap();
    assert!(g.nodes().is_empty());
}

#[test]
fn backing_chain_implicit_and_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2(dir.path(), "base.qcow2", None);
    let top = qcow2(dir.path(), "top.qcow2", Some("base.qcow2"));
    let g = BlockGraph::new();
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "b",
               "file": {"driver": "file", "filename": base}}),
    )
    .unwrap();
    g.node("b").unwrap().write(&[7u8; 4096], 0).unwrap();
    g.node("b").unwrap().flush().unwrap();
    // Implicit backing from the header: auto-named nodes appear.
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "t1", "read-only": true,
               "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    g.node("t1").unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    assert!(g.nodes().iter().any(|n| n.implicit()));
    // Explicit backing reference and backing: null.
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "t2", "read-only": true, "backing": "b",
               "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    g.node("t2").unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "t3", "read-only": true, "backing": null,
               "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    g.node("t3").unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 4096]);
    assert_eq!(
        g.blockdev_del("b").unwrap_err().desc,
        "Block device b is in use"
    );
    assert!(g.close_all().is_empty());
}

#[test]
fn qemu_io_commands() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "a.qcow2", None);
    let g = BlockGraph::new();
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "q0", "discard": "unmap",
               "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
    let n = g.node("q0").unwrap();
    use strata_block::qemu_io::run;
    assert!(run(&n, "write -P 0x5a 0 64k")
        .starts_with("wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops;"));
    assert!(!run(&n, "read -P 0x5a 0 64k").contains("verification failed"));
    assert!(run(&n, "read -P 0x11 0 512")
        .starts_with("Pattern verification failed at offset 0, 512 bytes"));
    run(&n, "write -z 0 4k");
    assert!(!run(&n, "read -P 0 0 4k").contains("failed"));
    run(&n, "discard 0 64k");
    assert!(!run(&n, "read -P 0 0 64k").contains("failed"));
    assert_eq!(run(&n, "bogus"), "command \"bogus\" not found\n");
    assert!(run(&n, "write 0 16M").starts_with("write failed"));
    assert_eq!(run(&n, "flush"), "");
    assert!(g.close_all().is_empty());
}
