//! In-process robustness tests over real sockets: hostile input, many
//! clients, disconnects, events interleaved with responses, shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_qmp::{Command, ObjectType, QmpServer, Registry, Type};

fn server() -> (QmpServer, tempfile::TempDir, PathBuf) {
    let mut reg = Registry::default();
    reg.register(
        Command::new("sleep", |a, _| {
            std::thread::sleep(Duration::from_millis(a["ms"].as_u64().unwrap_or(0)));
            Ok(Value::Null)
        })
        .args(ObjectType::new("sleep-arg").member("ms", Type::Uint32)),
    )
    .unwrap();
    reg.register(
        Command::new("emit", |a, ctx| {
            for i in 0..a["n"].as_u64().unwrap_or(1) {
                ctx.events().emit("TICK", Some(json!({"i": i})));
            }
            Ok(json!({"done": true}))
        })
        .args(ObjectType::new("emit-arg").member("n", Type::Uint32)),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let s = QmpServer::new(reg);
    s.listen_unix(&path).unwrap();
    (s, dir, path)
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &PathBuf) -> Client {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        let mut c = Client { w, r };
        let g = c.line();
        assert!(g.starts_with("{\"QMP\": "), "{g}");
        c
    }
    fn negotiated(path: &PathBuf) -> Client {
        let mut c = Client::connect(path);
        assert_eq!(
            c.cmd(r#"{"execute":"qmp_capabilities"}"#),
            "{\"return\": {}}"
        );
        c
    }
    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.r.read_line(&mut s).unwrap();
        assert!(s.ends_with("\r\n"), "no CRLF in {s:?}");
        s.truncate(s.len() - 2);
        s
    }
    fn cmd(&mut self, c: &str) -> String {
        self.send(c.as_bytes());
        self.send(b"\n");
        self.line()
    }
}

fn alive(path: &PathBuf) {
    let mut c = Client::negotiated(path);
    let r = c.cmd(r#"{"execute":"query-version","id":"alive"}"#);
    assert!(r.contains("\"id\": \"alive\""), "{r}");
}

#[test]
fn huge_line_is_rejected_and_server_survives() {
    let (_s, _d, path) = server();
    let mut c = Client::negotiated(&path);
    let mut big = b"{\"execute\":\"x\",\"id\":\"".to_vec();
    big.resize(big.len() + (100 << 20), b'A');
    big.extend_from_slice(b"\"}\n{\"execute\":\"query-version\",\"id\":2}\n");
    let mut w = c.w.try_clone().unwrap();
    let t = std::thread::spawn(move || w.write_all(&big));
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#
    );
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray 'A'"}}"#
    );
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#
    );
    assert!(c.line().contains("\"id\": 2"));
    t.join().unwrap().unwrap();
    alive(&path);
}

#[test]
fn deep_nesting_and_invalid_utf8() {
    let (_s, _d, path) = server();
    let mut c = Client::negotiated(&path);
    let mut deep = vec![b'['; 2000];
    deep.extend(vec![b']'; 2000 - 1025]);
    deep.push(b'\n');
    c.send(&deep);
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}"#
    );
    // the remaining 975 brackets form a new value once balanced
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
    c.send(b"\xff\xfe\x80{\"execute\":\"query-version\",\"id\":\"\xc3\x28\"}\n");
    let mut seen = Vec::new();
    for _ in 0..8 {
        let l = c.line();
        let done = l.contains("invalid UTF-8");
        seen.push(l);
        if done {
            break;
        }
    }
    assert!(seen.iter().all(|l| l.is_ascii()), "{seen:?}");
    alive(&path);
}

#[test]
fn hundred_clients_at_once() {
    let (_s, _d, path) = server();
    let start = Instant::now();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::negotiated(&path);
                let r = c.cmd(&format!(r#"{{"execute":"query-version","id":{i}}}"#));
                assert!(r.ends_with(&format!("\"id\": {i}}}")), "{r}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn disconnect_mid_command() {
    let (s, _d, path) = server();
    for _ in 0..5 {
        let mut c = Client::negotiated(&path);
        c.send(b"{\"execute\":\"sleep\",\"arguments\":{\"ms\":200}}\n{\"execute\":\"sleep\",\"arguments\":{\"ms\":1}}\n");
        drop(c);
    }
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(b"{\"execute\":\"qmp_capabil").unwrap();
    drop(half);
    alive(&path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.active_monitors() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.active_monitors(), 0);
}

#[test]
fn events_interleave_whole_and_only_after_negotiation() {
    let (s, _d, path) = server();
    let mut early = Client::connect(&path);
    let mut a = Client::negotiated(&path);
    let mut b = Client::negotiated(&path);
    let r = a.cmd(r#"{"execute":"emit","arguments":{"n":50},"id":"e"}"#);
    let mut lines = vec![r];
    while !lines.last().unwrap().contains("\"id\": \"e\"") {
        lines.push(a.line());
    }
    // 50 events, then the response: each line a complete JSON object
    assert_eq!(lines.len(), 51, "{lines:?}");
    for (i, l) in lines[..50].iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["event"], "TICK");
        assert_eq!(v["data"]["i"], i);
        assert!(v["timestamp"]["seconds"].as_i64().unwrap() > 0);
        assert!(l.starts_with("{\"timestamp\": {\"seconds\": "), "{l}");
    }
    for i in 0..50 {
        let v: Value = serde_json::from_str(&b.line()).unwrap();
        assert_eq!(v["data"]["i"], i);
    }
    s.events().emit("FROM_EMBEDDER", None);
    assert!(b.line().contains("FROM_EMBEDDER"));
    // the unnegotiated client got no events
    assert_eq!(
        early.cmd(r#"{"execute":"qmp_capabilities","id":1}"#),
        "{\"return\": {}, \"id\": 1}"
    );
}

#[test]
fn tcp_monitor_and_shutdown() {
    let (s, _d, path) = server();
    let addr = s.listen_tcp("127.0.0.1:0").unwrap();
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(t.try_clone().unwrap());
    let mut g = String::new();
    r.read_line(&mut g).unwrap();
    assert!(g.starts_with("{\"QMP\""));
    t.write_all(b"{\"execute\":\"qmp_capabilities\"}\r\n")
        .unwrap();
    g.clear();
    r.read_line(&mut g).unwrap();
    assert_eq!(g, "{\"return\": {}}\r\n");
    let mut c = Client::negotiated(&path);
    s.shutdown();
    let mut rest = Vec::new();
    assert_eq!(c.r.read_to_end(&mut rest).unwrap_or(0), 0);
    assert!(!path.exists(), "socket file removed");
}

#[test]
fn quit_stops_run_until_quit() {
    let (s, _d, path) = server();
    let runner = {
        let s = s.clone();
        std::thread::spawn(move || s.run_until_quit())
    };
    let mut c = Client::negotiated(&path);
    // input after `quit` must not turn the close into a connection reset
    c.send(b"{\"execute\":\"quit\",\"id\":\"q\"}\n{\"execute\":\"query-version\"}\n\n");
    assert_eq!(c.line(), "{\"return\": {}, \"id\": \"q\"}");
    let mut rest = Vec::new();
    c.r.read_to_end(&mut rest)
        .expect("orderly EOF, not a reset");
    assert!(rest.is_empty(), "{rest:?}");
    drop(c);
    runner.join().unwrap();
}
