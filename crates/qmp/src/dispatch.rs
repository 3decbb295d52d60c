//! The command registry and request dispatch (QEMU's `qmp_dispatch()` and
//! the capabilities-negotiation rules of `monitor/qmp.c`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{ErrorClass, QmpError};
use crate::events::EventSender;
use crate::json::{Json, Message};
use crate::output::qdict_order;
use crate::schema::{check_args, ObjectType, SchemaWriter, Type};
use crate::server::Outbox;

/// A command handler: validated arguments in, return value or error out.
pub type Handler =
    Arc<dyn Fn(&Map<String, Value>, &Context<'_>) -> Result<Value, QmpError> + Send + Sync>;

type RawHandler = Arc<dyn Fn(&Json, &Context<'_>) -> Result<Json, QmpError> + Send + Sync>;

#[derive(Clone)]
enum HandlerKind {
    Serde(Handler),
    Raw(RawHandler),
}

/// A registered command: name, argument schema, return type and handler.
#[derive(Clone)]
pub struct Command {
    name: String,
    args: Arc<ObjectType>,
    ret: Type,
    allow_oob: bool,
    features: Vec<String>,
    handler: HandlerKind,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Command {
    /// A command without arguments returning an empty object; refine with
    /// the builder methods.
    pub fn new(
        name: impl Into<String>,
        handler: impl Fn(&Map<String, Value>, &Context<'_>) -> Result<Value, QmpError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let name = name.into();
        Command {
            args: Arc::new(ObjectType::new(format!("q_obj_{name}-arg"))),
            name,
            ret: ObjectType::new("").into_type(),
            allow_oob: false,
            features: Vec::new(),
            handler: HandlerKind::Serde(Arc::new(handler)),
        }
    }

    /// A command whose arguments deserialize into `A` (after the schema
    /// check, so use the same member names, e.g. with
    /// `#[serde(rename_all = "kebab-case")]`) and whose result serializes
    /// from `R` (`()` answers `{}`).
    pub fn typed<A, R, F>(name: impl Into<String>, f: F) -> Self
    where
        A: serde::de::DeserializeOwned,
        R: serde::Serialize,
        F: Fn(A, &Context<'_>) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        Command::new(name, move |args, ctx| {
            let a: A = serde_json::from_value(Value::Object(args.clone()))
                .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))?;
            let r = f(a, ctx)?;
            serde_json::to_value(r)
                .map_err(|e| QmpError::generic(format!("Cannot encode the result: {e}")))
        })
    }

    fn raw(
        name: &str,
        handler: impl Fn(&Json, &Context<'_>) -> Result<Json, QmpError> + Send + Sync + 'static,
    ) -> Self {
        let mut c = Command::new(name, |_, _| Ok(Value::Null));
        c.handler = HandlerKind::Raw(Arc::new(handler));
        c
    }

    /// Sets the argument type (its members are the command's parameters).
    pub fn args(mut self, args: ObjectType) -> Self {
        self.args = Arc::new(args);
        self
    }

    /// Sets the return type (used by `query-qmp-schema` and to order the
    /// members of returned objects as QEMU would).
    pub fn returns(mut self, ret: Type) -> Self {
        self.ret = ret;
        self
    }

    /// Allows `exec-oob` for this command; its handler may then run on a
    /// monitor's reader thread, concurrently with in-band commands.
    pub fn allow_oob(mut self) -> Self {
        self.allow_oob = true;
        self
    }

    /// Adds a feature flag shown in `query-qmp-schema` (e.g. `deprecated`).
    pub fn feature(mut self, f: impl Into<String>) -> Self {
        self.features.push(f.into());
        self
    }

    /// The command name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Errors from building a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Two commands (or events) with one name.
    #[error("QMP command or event '{0}' registered twice")]
    Duplicate(String),
}

/// The version a server reports in its greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Major version.
    pub major: i64,
    /// Minor version.
    pub minor: i64,
    /// Micro version.
    pub micro: i64,
    /// Free-form package string.
    pub package: String,
}

impl Default for VersionInfo {
    /// QEMU 10.0.2, the QMP dialect implemented, with a Strata package string.
    fn default() -> Self {
        VersionInfo {
            major: 10,
            minor: 0,
            micro: 2,
            package: format!("strata {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl VersionInfo {
    fn to_json(&self) -> Json {
        Json::Object(vec![
            (
                "qemu".into(),
                Json::Object(vec![
                    ("major".into(), Json::Int(self.major)),
                    ("minor".into(), Json::Int(self.minor)),
                    ("micro".into(), Json::Int(self.micro)),
                ]),
            ),
            ("package".into(), Json::Str(self.package.clone())),
        ])
    }
}

/// The set of commands and events a server offers.
pub struct Registry {
    commands: Vec<Command>,
    index: HashMap<String, usize>,
    events: Vec<(String, Arc<ObjectType>)>,
    version: VersionInfo,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "commands",
                &self.commands.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(VersionInfo::default())
    }
}

/// Context passed to handlers.
pub struct Context<'a> {
    pub(crate) registry: &'a Registry,
    pub(crate) events: &'a EventSender,
    pub(crate) monitor: &'a Outbox,
    pub(crate) quit: &'a AtomicBool,
}

impl Context<'_> {
    /// The server's event broadcaster.
    pub fn events(&self) -> &EventSender {
        self.events
    }

    /// The registry being served.
    pub fn registry(&self) -> &Registry {
        self.registry
    }

    /// An id for the monitor connection that sent the command.
    pub fn monitor_id(&self) -> u64 {
        self.monitor.id()
    }

    /// Asks the server to shut down after this command's response is sent
    /// (what `quit` does).
    pub fn request_quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }
}

/// QEMU's `SchemaInfo` (qapi/introspect.json), the element type of
/// `query-qmp-schema`'s result.
fn schema_info_type() -> Type {
    let features = || Type::array(Type::Str);
    let meta = Type::enumeration(
        "SchemaMetaType",
        &[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ],
    );
    let json_type = Type::enumeration(
        "JSONType",
        &[
            "string", "number", "int", "boolean", "null", "object", "array", "value",
        ],
    );
    let enum_member = ObjectType::new("SchemaInfoEnumMember")
        .member("name", Type::Str)
        .optional("features", features());
    let object_member = ObjectType::new("SchemaInfoObjectMember")
        .member("name", Type::Str)
        .member("type", Type::Str)
        .optional("default", Type::Any)
        .optional("features", features());
    let variant = ObjectType::new("SchemaInfoObjectVariant")
        .member("case", Type::Str)
        .member("type", Type::Str);
    let alt_member = ObjectType::new("SchemaInfoAlternateMember").member("type", Type::Str);
    ObjectType::new("SchemaInfo")
        .member("name", Type::Str)
        .member("meta-type", meta)
        .optional("features", features())
        .variants(
            "meta-type",
            vec![
                (
                    "builtin".into(),
                    ObjectType::new("SchemaInfoBuiltin").member("json-type", json_type),
                ),
                (
                    "enum".into(),
                    ObjectType::new("SchemaInfoEnum")
                        .member("members", Type::array(enum_member.into_type()))
                        .member("values", Type::array(Type::Str))
                        .feature("deprecated"),
                ),
                (
                    "array".into(),
                    ObjectType::new("SchemaInfoArray").member("element-type", Type::Str),
                ),
                (
                    "object".into(),
                    ObjectType::new("SchemaInfoObject")
                        .member("members", Type::array(object_member.into_type()))
                        .optional("tag", Type::Str)
                        .optional("variants", Type::array(variant.into_type())),
                ),
                (
                    "alternate".into(),
                    ObjectType::new("SchemaInfoAlternate")
                        .member("members", Type::array(alt_member.into_type())),
                ),
                (
                    "command".into(),
                    ObjectType::new("SchemaInfoCommand")
                        .member("arg-type", Type::Str)
                        .member("ret-type", Type::Str)
                        .optional("allow-oob", Type::Bool),
                ),
                (
                    "event".into(),
                    ObjectType::new("SchemaInfoEvent").member("arg-type", Type::Str),
                ),
            ],
        )
        .into_type()
}

fn version_type() -> Type {
    let triple = ObjectType::new("VersionTriple")
        .member("major", Type::Int)
        .member("minor", Type::Int)
        .member("micro", Type::Int);
    ObjectType::new("VersionInfo")
        .member("qemu", triple.into_type())
        .member("package", Type::Str)
        .into_type()
}

impl Registry {
    /// A registry with the built-in commands `qmp_capabilities`,
    /// `query-version`, `query-commands`, `query-qmp-schema` and `quit`.
    pub fn new(version: VersionInfo) -> Self {
        let mut r = Registry {
            commands: Vec::new(),
            index: HashMap::new(),
            events: Vec::new(),
            version,
        };
        let caps = Type::array(Type::enumeration("QMPCapability", &["oob"]));
        let builtins = [
            Command::raw("qmp_capabilities", |args, ctx| {
                if ctx.monitor.negotiated() {
                    return Err(QmpError::command_not_found(
                        "Capabilities negotiation is already complete, command ignored",
                    ));
                }
                let oob = matches!(args.get("enable"), Some(Json::Array(a)) if a.iter().any(|c| *c == Json::Str("oob".into())));
                ctx.monitor.set_capabilities(oob);
                Ok(Json::Object(vec![]))
            })
            .args(ObjectType::new("q_obj_qmp_capabilities-arg").optional("enable", caps)),
            Command::raw("query-version", |_, ctx| Ok(ctx.registry.version.to_json())).returns(version_type()),
            Command::raw("query-commands", |_, ctx| {
                let list = ctx
                    .registry
                    .commands
                    .iter()
                    .rev()
                    .map(|c| Json::Object(vec![("name".into(), Json::Str(c.name.clone()))]))
                    .collect();
                Ok(Json::Array(list))
            })
            .returns(Type::array(ObjectType::new("CommandInfo").member("name", Type::Str).into_type())),
            Command::raw("query-qmp-schema", |_, ctx| Ok(ctx.registry.schema()))
                .returns(Type::array(schema_info_type())),
            Command::raw("quit", |_, ctx| {
                ctx.request_quit();
                Ok(Json::Object(vec![]))
            }),
        ];
        for c in builtins {
            // Built-in names are distinct.
            let _ = r.register(c);
        }
        r
    }

    /// Adds a command. Fails if the name is taken.
    pub fn register(&mut self, cmd: Command) -> Result<&mut Self, RegistryError> {
        if self.index.contains_key(&cmd.name) {
            return Err(RegistryError::Duplicate(cmd.name));
        }
        self.index.insert(cmd.name.clone(), self.commands.len());
        self.commands.push(cmd);
        Ok(self)
    }

    /// Declares an event and its data type (for `query-qmp-schema`).
    pub fn register_event(
        &mut self,
        name: impl Into<String>,
        data: ObjectType,
    ) -> Result<&mut Self, RegistryError> {
        let name = name.into();
        if self.events.iter().any(|(n, _)| *n == name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.events.push((name, Arc::new(data)));
        Ok(self)
    }

    /// Looks a command up.
    pub fn command(&self, name: &str) -> Option<&Command> {
        self.index.get(name).map(|&i| &self.commands[i])
    }

    /// Names of all commands, in registration order.
    pub fn command_names(&self) -> impl Iterator<Item = &str> {
        self.commands.iter().map(|c| c.name.as_str())
    }

    /// The version reported by the greeting and `query-version`.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The `query-qmp-schema` return value.
    pub fn schema(&self) -> Json {
        let mut w = SchemaWriter::new();
        for c in &self.commands {
            w.command(&c.name, &c.args, &c.ret, c.allow_oob, &c.features);
        }
        for (name, data) in &self.events {
            w.event(name, data);
        }
        w.finish()
    }

    /// The greeting sent when a monitor connects.
    pub fn greeting(&self) -> Json {
        Json::Object(vec![(
            "QMP".into(),
            Json::Object(vec![
                ("version".into(), self.version.to_json()),
                (
                    "capabilities".into(),
                    Json::Array(vec![Json::Str("oob".into())]),
                ),
            ]),
        )])
    }
}

/// Orders the members of a handler's return value as QEMU's output visitor
/// would insert them: schema member order, unknown members after.
pub fn typed_json(v: &Value, ty: &Type) -> Json {
    match (v, ty) {
        (Value::Object(m), Type::Object(o)) => {
            let mut names: Vec<&str> = o.members.iter().map(|m| m.name.as_str()).collect();
            let mut types: Vec<&Type> = o.members.iter().map(|m| &m.ty).collect();
            if let Some(var) = &o.variants {
                if let Some(Value::String(tag)) = m.get(&var.tag) {
                    if let Some((_, case)) = var.cases.iter().find(|(k, _)| k == tag) {
                        names.extend(case.members.iter().map(|m| m.name.as_str()));
                        types.extend(case.members.iter().map(|m| &m.ty));
                    }
                }
            }
            let mut out = Vec::new();
            for (n, t) in names.iter().zip(types) {
                if let Some(val) = m.get(*n) {
                    out.push((n.to_string(), typed_json(val, t)));
                }
            }
            for (k, val) in m {
                if !names.contains(&k.as_str()) {
                    out.push((k.clone(), Json::from_serde(val)));
                }
            }
            Json::Object(out)
        }
        (Value::Array(a), Type::Array(elem)) => {
            Json::Array(a.iter().map(|x| typed_json(x, elem)).collect())
        }
        (_, Type::Alternate(alt)) => {
            let j = Json::from_serde(v);
            for b in &alt.branches {
                if crate::schema::check_value(b, &j).is_ok() {
                    return typed_json(v, b);
                }
            }
            j
        }
        _ => Json::from_serde(v),
    }
}

pub(crate) fn error_response(err: &QmpError, id: Option<Json>) -> Json {
    let mut m = vec![(
        "error".to_string(),
        Json::Object(vec![
            ("class".into(), Json::Str(err.class.as_str().into())),
            ("desc".into(), Json::Str(err.desc.clone())),
        ]),
    )];
    if let Some(id) = id {
        m.push(("id".into(), id));
    }
    Json::Object(m)
}

/// Whether a request is to run out-of-band (has `exec-oob`, no `execute`).
pub fn is_oob(req: &Json) -> bool {
    req.get("exec-oob").is_some() && req.get("execute").is_none()
}

/// Validates the request envelope; returns the command name and whether it
/// came as `exec-oob`.
fn check_obj(members: &[(String, Json)], allow_oob: bool) -> Result<(String, bool), QmpError> {
    let mut exec: Option<(&str, &str)> = None;
    for i in qdict_order(members) {
        let (k, v) = (&members[i].0, &members[i].1);
        if k == "execute" || (k == "exec-oob" && allow_oob) {
            let Json::Str(cmd) = v else {
                return Err(QmpError::generic(format!(
                    "QMP input member '{k}' must be a string"
                )));
            };
            if let Some((prev, _)) = exec {
                return Err(QmpError::generic(format!(
                    "QMP input member '{k}' clashes with '{prev}'"
                )));
            }
            exec = Some((k, cmd));
        } else if k == "arguments" {
            if !matches!(v, Json::Object(_)) {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ));
            }
        } else if k != "id" {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
    }
    match exec {
        Some((k, cmd)) => Ok((cmd.to_string(), k == "exec-oob")),
        None => Err(QmpError::generic("QMP input lacks member 'execute'")),
    }
}

fn run(ctx: &Context<'_>, req: &Json) -> Result<Json, QmpError> {
    let Json::Object(members) = req else {
        return Err(QmpError::generic("QMP input must be a JSON object"));
    };
    let (name, oob) = check_obj(members, ctx.monitor.oob_enabled())?;
    let negotiating = !ctx.monitor.negotiated();
    let cmd = ctx
        .registry
        .command(&name)
        .filter(|c| !negotiating || c.name == "qmp_capabilities")
        .ok_or_else(|| {
            QmpError::command_not_found(format!("The command {name} has not been found"))
        })?;
    if oob && !cmd.allow_oob {
        return Err(QmpError::generic(format!(
            "The command {name} does not support OOB"
        )));
    }
    let empty = Json::Object(Vec::new());
    let args = req.get("arguments").unwrap_or(&empty);
    check_args(&cmd.args, args).map_err(QmpError::generic)?;
    // A panicking handler is a bug in the embedding program; it must not take
    // the monitor (or the executor thread) down.
    let call = std::panic::AssertUnwindSafe(|| call_handler(cmd, args, ctx));
    std::panic::catch_unwind(call).unwrap_or_else(|_| {
        tracing::error!(command = %name, "QMP command handler panicked");
        Err(QmpError::generic(format!(
            "Internal error in command {name}"
        )))
    })
}

fn call_handler(cmd: &Command, args: &Json, ctx: &Context<'_>) -> Result<Json, QmpError> {
    match &cmd.handler {
        HandlerKind::Raw(h) => h(args, ctx),
        HandlerKind::Serde(h) => {
            let map = match args.to_serde() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let v = h(&map, ctx)?;
            Ok(match v {
                Value::Null => Json::Object(Vec::new()),
                v => typed_json(&v, &cmd.ret),
            })
        }
    }
}

/// Handles one parsed input message and returns the response to send.
pub(crate) fn dispatch(ctx: &Context<'_>, msg: Message) -> Json {
    let req = match msg {
        Ok(r) => r,
        Err(desc) => return error_response(&QmpError::generic(desc), None),
    };
    let id = req.get("id").cloned();
    let negotiating = !ctx.monitor.negotiated();
    match run(ctx, &req) {
        Ok(ret) => {
            let mut m = vec![("return".to_string(), ret)];
            if let Some(id) = id {
                m.push(("id".into(), id));
            }
            Json::Object(m)
        }
        Err(mut e) => {
            if negotiating && e.class == ErrorClass::CommandNotFound {
                e.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
            }
            error_response(&e, id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;
    use crate::output::to_json_string;

    fn session(reg: &Registry) -> (Arc<Outbox>, EventSender, AtomicBool) {
        let _ = reg;
        (
            Arc::new(Outbox::detached()),
            EventSender::new(),
            AtomicBool::new(false),
        )
    }

    fn send(reg: &Registry, out: &Outbox, ev: &EventSender, q: &AtomicBool, line: &str) -> String {
        let ctx = Context {
            registry: reg,
            events: ev,
            monitor: out,
            quit: q,
        };
        to_json_string(&dispatch(&ctx, parse(line.as_bytes())))
    }

    #[test]
    fn negotiation_and_errors() {
        let mut reg = Registry::default();
        reg.register(
            Command::new("echo", |a, _| Ok(Value::Object(a.clone()))).args(
                ObjectType::new("e")
                    .member("node-name", Type::Str)
                    .optional("n", Type::Int),
            ),
        )
        .unwrap();
        let (out, ev, q) = session(&reg);
        let s = |l: &str| send(&reg, &out, &ev, &q, l);
        assert_eq!(
            s(r#"{"execute":"query-version"}"#),
            r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"qmp_capabilities","arguments":{"foo":1}}"#),
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"qmp_capabilities","id":[1]}"#),
            r#"{"return": {}, "id": [1]}"#
        );
        assert_eq!(
            s(r#"{"execute":"qmp_capabilities","id":4}"#),
            r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"nope","id":1}"#),
            r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
        );
        assert_eq!(
            s("[1]"),
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
        );
        assert_eq!(
            s(r#"{"id":1}"#),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#
        );
        assert_eq!(
            s(r#"{"execute":1}"#),
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#
        );
        assert_eq!(
            s(r#"{"exec-oob":"query-version","id":5}"#),
            r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"echo","arguments":{}}"#),
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'node-name' is missing"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"echo","arguments":{"node-name":"a","n":5}}"#),
            r#"{"return": {"n": 5, "node-name": "a"}}"#
        );
        assert_eq!(
            s(r#"{"execute":"query-version"}"#),
            format!(
                r#"{{"return": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": "strata {}"}}}}"#,
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn oob_rules() {
        let mut reg = Registry::default();
        reg.register(Command::new("fast", |_, _| Ok(Value::Null)).allow_oob())
            .unwrap();
        let (out, ev, q) = session(&reg);
        let s = |l: &str| send(&reg, &out, &ev, &q, l);
        assert_eq!(
            s(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
            r#"{"return": {}}"#
        );
        assert_eq!(
            s(r#"{"exec-oob":"fast","id":"a"}"#),
            r#"{"return": {}, "id": "a"}"#
        );
        assert_eq!(
            s(r#"{"exec-oob":"query-version","id":"b"}"#),
            r#"{"id": "b", "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#
        );
    }

    #[test]
    fn enable_rejects_unknown_capability() {
        let reg = Registry::default();
        let (out, ev, q) = session(&reg);
        assert_eq!(
            send(
                &reg,
                &out,
                &ev,
                &q,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"#
            ),
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'x'"}}"#
        );
    }

    #[test]
    fn handler_panic_is_an_error() {
        let mut reg = Registry::default();
        reg.register(Command::new("boom", |_, _| panic!("handler bug")))
            .unwrap();
        let (out, ev, q) = session(&reg);
        let s = |l: &str| send(&reg, &out, &ev, &q, l);
        s(r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            s(r#"{"execute":"boom","id":1}"#),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "Internal error in command boom"}}"#
        );
    }

    #[test]
    fn schema_shape() {
        let mut reg = Registry::default();
        let alt = Type::alternate("StrOrNull", vec![Type::Str, Type::Null]);
        reg.register(
            Command::new("x", |_, _| Ok(Value::Null))
                .args(
                    ObjectType::new("x-arg")
                        .member("a", Type::enumeration("E", &["p", "q"]))
                        .optional("b", Type::array(Type::Uint32))
                        .feature("deprecated")
                        .optional("c", alt),
                )
                .feature("unstable"),
        )
        .unwrap();
        reg.register_event("EV", ObjectType::new("ev").member("id", Type::Str))
            .unwrap();
        let schema = reg.schema().to_serde();
        let list = schema.as_array().unwrap();
        let find = |n: &str| {
            list.iter()
                .find(|e| e["name"] == n)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let x = find("x");
        assert_eq!(x["meta-type"], "command");
        assert_eq!(x["features"], serde_json::json!(["unstable"]));
        assert!(x.get("allow-oob").is_none());
        let ret = find(x["ret-type"].as_str().unwrap());
        assert_eq!(ret["members"], serde_json::json!([]));
        // all member-less objects share one name, as in QEMU
        assert_eq!(find("quit")["arg-type"], x["ret-type"]);
        assert_eq!(find("quit")["ret-type"], x["ret-type"]);
        let args = find(x["arg-type"].as_str().unwrap());
        assert_eq!(args["meta-type"], "object");
        let m = args["members"].as_array().unwrap();
        assert_eq!(m[0]["name"], "a");
        assert!(m[0].get("default").is_none());
        assert_eq!(
            m[1],
            serde_json::json!({"name": "b", "default": null, "type": "[int]", "features": ["deprecated"]})
        );
        let e = find(m[0]["type"].as_str().unwrap());
        assert_eq!(
            e,
            serde_json::json!({"name": m[0]["type"], "meta-type": "enum", "members": [{"name": "p"}, {"name": "q"}], "values": ["p", "q"]})
        );
        assert_eq!(
            find("[int]"),
            serde_json::json!({"name": "[int]", "meta-type": "array", "element-type": "int"})
        );
        let alt = find(m[2]["type"].as_str().unwrap());
        assert_eq!(alt["meta-type"], "alternate");
        assert_eq!(
            alt["members"],
            serde_json::json!([{"type": "str"}, {"type": "null"}])
        );
        assert_eq!(find("EV")["meta-type"], "event");
        assert_eq!(
            find("int"),
            serde_json::json!({"name": "int", "meta-type": "builtin", "json-type": "int"})
        );
    }

    #[test]
    fn typed_commands() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Args {
            node_name: String,
            size: Option<u64>,
        }
        #[derive(serde::Serialize)]
        struct Ret {
            node: String,
            size: u64,
        }
        let mut reg = Registry::default();
        reg.register(
            Command::typed("resize", |a: Args, _| {
                Ok(Ret {
                    node: a.node_name,
                    size: a.size.unwrap_or(0),
                })
            })
            .args(
                ObjectType::new("r")
                    .member("node-name", Type::Str)
                    .optional("size", Type::Uint64),
            )
            .returns(
                ObjectType::new("R")
                    .member("node", Type::Str)
                    .member("size", Type::Int)
                    .into_type(),
            ),
        )
        .unwrap();
        reg.register(Command::typed("unit", |_: Map<String, Value>, _| Ok(())))
            .unwrap();
        let (out, ev, q) = session(&reg);
        let s = |l: &str| send(&reg, &out, &ev, &q, l);
        s(r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            s(r#"{"execute":"resize","arguments":{"node-name":"n","size":5}}"#),
            r#"{"return": {"size": 5, "node": "n"}}"#
        );
        assert_eq!(s(r#"{"execute":"unit"}"#), r#"{"return": {}}"#);
    }
}
