//! strata-qmp: QEMU 10's QMP monitor protocol for Strata.
//!
//! * [`json`]: QEMU-compatible input (lexer, message framing, limits, errors);
//! * [`output`]: byte-exact QEMU output formatting (member order, escapes);
//! * [`schema`]: QAPI-like types and argument checking with QEMU's texts;
//! * [`dispatch`]: the command [`Registry`] with the built-in commands;
//! * [`events`]: the [`EventSender`] broadcaster;
//! * [`server`]: [`QmpServer`], monitors on unix and TCP sockets;
//! * [`session`]: [`Session`], one monitor in process (bytes in, bytes out);
//! * [`blockdev`]: the block-layer commands (nodes, bitmaps, jobs, backup) that the
//!   storage daemon and the VMM register.
//!
//! An embedding program builds a [`Registry`], registers its commands with
//! [`Command`] and an argument [`ObjectType`], then serves it:
//!
//! ```no_run
//! use strata_qmp::{Command, ObjectType, QmpServer, Registry, Type, QmpError};
//! let mut reg = Registry::default();
//! reg.register(
//!     Command::new("block_resize", |args, _ctx| {
//!         let _size = args["size"].as_i64();
//!         Err(QmpError::device_not_found("Cannot find device='' nor node-name='x'"))
//!     })
//!     .args(ObjectType::new("q_obj_block_resize-arg")
//!         .optional("node-name", Type::Str)
//!         .member("size", Type::Int)),
//! ).unwrap();
//! let server = QmpServer::new(reg);
//! server.listen_unix("/run/strata/qmp.sock").unwrap();
//! server.events().emit("SOMETHING", Some(serde_json::json!({"x": 1})));
//! server.run_until_quit();
//! ```

pub mod blockdev;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod json;
pub mod output;
pub mod schema;
pub mod server;
pub mod session;

pub use dispatch::{Command, Context, Handler, Registry, RegistryError, VersionInfo};
pub use error::{ErrorClass, QmpError};
pub use events::EventSender;
pub use json::Json;
pub use schema::{AlternateType, EnumType, Member, ObjectType, Type, Variants};
pub use server::{ListenAddr, QmpServer};
pub use session::{RequestHook, Session};
pub use strata_jobs::EventSink;
