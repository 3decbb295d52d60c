//! The command line of `strata-storage-daemon`, spelled as `qemu-storage-daemon`'s:
//! `--blockdev` (key=value or JSON), `--export` (key=value or JSON),
//! `--chardev socket,...`, `--monitor chardev=...`,
//! `--pidfile`, `--daemonize`.

use std::path::PathBuf;

use clap::Parser;
use strata_block::options::keyval_to_json;
use strata_qmp::ListenAddr;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "strata-storage-daemon",
    version,
    about = "Strata storage daemon: a QEMU-compatible block layer served over QMP",
    disable_version_flag = true
)]
pub struct Args {
    /// Adds a block node: `driver=...,node-name=...,...` or a JSON object.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// Adds a character device: `socket,id=ID,path=PATH|host=HOST,port=PORT,server=on,wait=off`.
    #[arg(long = "chardev", value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// Adds a block export: `type=vhost-user-blk,id=ID,node-name=NODE,addr.type=unix,
    /// addr.path=PATH[,writable=on|off][,num-queues=N][,logical-block-size=N]`.
    #[arg(long = "export", value_name = "OPTIONS")]
    pub export: Vec<String>,
    /// Adds a QMP monitor on a chardev: `chardev=ID[,mode=control][,pretty=on|off]`.
    #[arg(long = "monitor", value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// Writes the process id to FILE.
    #[arg(long = "pidfile", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Runs in the background once initialised.
    #[arg(long = "daemonize")]
    pub daemonize: bool,
    /// Prints the version and exits.
    #[arg(short = 'V', long = "version")]
    pub version: bool,
}

/// A parsed `--chardev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chardev {
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: ListenAddr,
}

fn kv(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match keyval_to_json(s).map_err(|e| e.desc)? {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err("expected key=value options".into()),
    }
}

/// Parses a `--chardev socket,...` option.
pub fn parse_chardev(s: &str) -> Result<Chardev, String> {
    let (backend, rest) = s.split_once(',').unwrap_or((s, ""));
    if backend != "socket" {
        return Err(format!(
            "chardev backend '{backend}' is not supported (use socket)"
        ));
    }
    let m = kv(rest)?;
    let get = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let id = get("id").ok_or("Parameter 'id' is missing")?;
    for k in m.keys() {
        if !matches!(
            k.as_str(),
            "id" | "path" | "host" | "port" | "server" | "wait" | "ipv4" | "ipv6"
        ) {
            return Err(format!("Invalid parameter '{k}'"));
        }
    }
    if get("server").as_deref().is_some_and(|v| v != "on") {
        return Err("only server=on sockets are supported".into());
    }
    let addr = match (get("path"), get("host"), get("port")) {
        (Some(p), None, None) => ListenAddr::Unix(PathBuf::from(p)),
        (None, h, Some(port)) => ListenAddr::Tcp(format!(
            "{}:{port}",
            h.unwrap_or_else(|| "localhost".into())
        )),
        _ => return Err("chardev socket needs path=..., or host=...,port=...".into()),
    };
    Ok(Chardev { id, addr })
}

/// Parses a `--monitor` option; returns the chardev id.
pub fn parse_monitor(s: &str) -> Result<String, String> {
    let m = kv(s)?;
    for (k, v) in &m {
        match (k.as_str(), v.as_str()) {
            ("chardev", _) => {}
            ("mode", Some("control")) => {}
            ("mode", Some(other)) => {
                return Err(format!("monitor mode '{other}' is not supported"))
            }
            ("pretty", _) => {}
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    m.get("chardev")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "Parameter 'chardev' is missing".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chardev_and_monitor() {
        let c = parse_chardev("socket,id=m0,path=/tmp/q.sock,server=on,wait=off").unwrap();
        assert_eq!(c.id, "m0");
        assert_eq!(c.addr, ListenAddr::Unix("/tmp/q.sock".into()));
        let c = parse_chardev("socket,id=t,host=127.0.0.1,port=4444,server=on,wait=off").unwrap();
        assert_eq!(c.addr, ListenAddr::Tcp("127.0.0.1:4444".into()));
        assert!(parse_chardev("file,id=x,path=y").is_err());
        assert_eq!(parse_monitor("chardev=m0,mode=control").unwrap(), "m0");
        assert!(parse_monitor("mode=readline,chardev=m0").is_err());
    }
}
