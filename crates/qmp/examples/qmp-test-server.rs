//! A small QMP server for protocol tests: the built-in commands plus a few
//! commands whose argument schemas copy QEMU's, and test helpers.
//!
//! Usage: `qmp-test-server [--unix PATH]... [--tcp HOST:PORT]...`
//! Prints `ready` on stdout once listening (TCP lines print the bound port).

use std::time::Duration;

use serde_json::{json, Value};
use strata_qmp::{Command, ObjectType, QmpError, QmpServer, Registry, Type};

fn registry() -> Registry {
    let mut reg = Registry::default();
    let not_found =
        |node: &str| QmpError::generic(format!("Cannot find device='' nor node-name='{node}'"));
    let bitmap = ObjectType::new("BlockDirtyBitmap")
        .member("node", Type::Str)
        .member("name", Type::Str);
    let or_str = Type::alternate(
        "BlockDirtyBitmapOrStr",
        vec![Type::Str, bitmap.clone().into_type()],
    );
    let cmds = vec![
        Command::new("block-dirty-bitmap-add", move |a, _| {
            Err(not_found(a["node"].as_str().unwrap_or("")))
        })
        .args(
            ObjectType::new("BlockDirtyBitmapAdd")
                .member("node", Type::Str)
                .member("name", Type::Str)
                .optional("granularity", Type::Uint32)
                .optional("persistent", Type::Bool)
                .optional("disabled", Type::Bool),
        ),
        Command::new("block-dirty-bitmap-merge", move |a, _| {
            Err(not_found(a["node"].as_str().unwrap_or("")))
        })
        .args(
            ObjectType::new("BlockDirtyBitmapMerge")
                .member("node", Type::Str)
                .member("target", Type::Str)
                .member("bitmaps", Type::array(or_str)),
        ),
        Command::new("query-named-block-nodes", |_, _| Ok(json!([]))).args(
            ObjectType::new("q_obj_query-named-block-nodes-arg").optional("flat", Type::Bool),
        ),
        Command::new("block_resize", |_, _| {
            Err(QmpError::generic("Cannot find device='' nor node-name=''"))
        })
        .args(
            ObjectType::new("q_obj_block_resize-arg")
                .optional("device", Type::Str)
                .optional("node-name", Type::Str)
                .member("size", Type::Int),
        ),
        Command::new("x-test-emit", |a, ctx| {
            let data = a.get("data").cloned();
            ctx.events()
                .emit(a["event"].as_str().unwrap_or("TEST"), data);
            Ok(Value::Null)
        })
        .args(
            ObjectType::new("x-test-emit-arg")
                .member("event", Type::Str)
                .optional("data", Type::Any),
        ),
        Command::new("x-test-sleep", |a, _| {
            std::thread::sleep(Duration::from_millis(
                a["ms"].as_u64().unwrap_or(0).min(10_000),
            ));
            Ok(json!({"slept": a["ms"]}))
        })
        .args(ObjectType::new("x-test-sleep-arg").member("ms", Type::Uint32)),
        Command::new("x-test-oob-ping", |_, ctx| {
            Ok(json!({"monitor": ctx.monitor_id()}))
        })
        .allow_oob(),
    ];
    for c in cmds {
        reg.register(c).expect("distinct test command names");
    }
    reg
}

fn main() {
    tracing_subscriber_init();
    let server = QmpServer::new(registry());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--unix" => server.listen_unix(&v).expect("listen on unix socket"),
            "--tcp" => {
                let addr = server.listen_tcp(v.as_str()).expect("listen on TCP");
                println!("tcp {addr}");
            }
            _ => {
                eprintln!("usage: qmp-test-server [--unix PATH]... [--tcp HOST:PORT]...");
                std::process::exit(2);
            }
        }
    }
    println!("ready");
    server.run_until_quit();
}

fn tracing_subscriber_init() {
    // Logging is optional for the test server; tracing without a subscriber is silent.
}
