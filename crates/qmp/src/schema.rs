//! QAPI-like types for command arguments, return values and event data.
//!
//! A command's arguments are an [`ObjectType`]; [`check_args`] walks a
//! request's `arguments` against it in member order and reports the first
//! problem with QEMU's QObject input visitor texts, e.g.
//! `Parameter 'node-name' is missing`, `Parameter 'foo' is unexpected`,
//! `Invalid parameter type for 'x', expected: string`. [`SchemaWriter`]
//! renders the types as `query-qmp-schema` `SchemaInfo` entries with QEMU's
//! opaque numeric names.

use std::collections::HashMap;
use std::sync::Arc;

use crate::json::Json;

/// A QAPI type.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    /// `str`
    Str,
    /// `int` / `int64`
    Int,
    /// `int8`
    Int8,
    /// `int16`
    Int16,
    /// `int32`
    Int32,
    /// `uint8`
    Uint8,
    /// `uint16`
    Uint16,
    /// `uint32`
    Uint32,
    /// `uint64`
    Uint64,
    /// `size` (checked like `uint64`)
    Size,
    /// `number` (any JSON number)
    Number,
    /// `bool`
    Bool,
    /// `null`
    Null,
    /// `any` (no check)
    Any,
    /// An enumeration of strings.
    Enum(Arc<EnumType>),
    /// An array of the element type.
    Array(Box<Type>),
    /// A struct, optionally a flat union.
    Object(Arc<ObjectType>),
    /// An alternate: the branch is picked by the JSON type of the value.
    Alternate(Arc<AlternateType>),
}

/// An enumeration type.
#[derive(Debug, Clone, PartialEq)]
pub struct EnumType {
    /// Type name (shown in nothing on the wire but kept for documentation).
    pub name: String,
    /// The accepted values, in schema order.
    pub values: Vec<String>,
}

/// One member of an object type.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Member name.
    pub name: String,
    /// Member type.
    pub ty: Type,
    /// Whether the member may be absent.
    pub optional: bool,
    /// Feature flags shown in `query-qmp-schema` (e.g. `deprecated`).
    pub features: Vec<String>,
}

/// The variant part of a flat union: the discriminator is a base member of
/// enum type; each enum value may add members.
#[derive(Debug, Clone, PartialEq)]
pub struct Variants {
    /// Name of the discriminator member.
    pub tag: String,
    /// Per-value extra members (values without an entry add none).
    pub cases: Vec<(String, Arc<ObjectType>)>,
}

/// A struct (or flat union) type.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectType {
    /// Type name (used in alternate error texts and documentation).
    pub name: String,
    /// Members in schema order.
    pub members: Vec<Member>,
    /// Flat-union variants, if any.
    pub variants: Option<Variants>,
}

/// An alternate type.
#[derive(Debug, Clone, PartialEq)]
pub struct AlternateType {
    /// Type name, shown in `expected: <name>` errors.
    pub name: String,
    /// The branches; at most one per JSON type.
    pub branches: Vec<Type>,
}

impl ObjectType {
    /// An empty struct type with a name.
    pub fn new(name: impl Into<String>) -> Self {
        ObjectType {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Adds a mandatory member.
    pub fn member(mut self, name: impl Into<String>, ty: Type) -> Self {
        self.members.push(Member {
            name: name.into(),
            ty,
            optional: false,
            features: Vec::new(),
        });
        self
    }

    /// Adds an optional member.
    pub fn optional(mut self, name: impl Into<String>, ty: Type) -> Self {
        self.members.push(Member {
            name: name.into(),
            ty,
            optional: true,
            features: Vec::new(),
        });
        self
    }

    /// Adds a feature flag (e.g. `deprecated`, `unstable`) to the member
    /// added last.
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        if let Some(m) = self.members.last_mut() {
            m.features.push(feature.into());
        }
        self
    }

    /// Makes this a flat union discriminated by the (enum) member `tag`.
    pub fn variants(mut self, tag: impl Into<String>, cases: Vec<(String, ObjectType)>) -> Self {
        self.variants = Some(Variants {
            tag: tag.into(),
            cases: cases.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        });
        self
    }

    /// Wraps into a [`Type`].
    pub fn into_type(self) -> Type {
        Type::Object(Arc::new(self))
    }
}

impl Type {
    /// An enum type.
    pub fn enumeration(name: impl Into<String>, values: &[&str]) -> Type {
        Type::Enum(Arc::new(EnumType {
            name: name.into(),
            values: values.iter().map(|s| s.to_string()).collect(),
        }))
    }

    /// An array of `elem`.
    pub fn array(elem: Type) -> Type {
        Type::Array(Box::new(elem))
    }

    /// An alternate type.
    pub fn alternate(name: impl Into<String>, branches: Vec<Type>) -> Type {
        Type::Alternate(Arc::new(AlternateType {
            name: name.into(),
            branches,
        }))
    }

    /// The builtin name for scalar types (`None` for compound types).
    /// All integer widths introspect as `int`, as in QEMU.
    pub fn builtin_name(&self) -> Option<&'static str> {
        Some(match self {
            Type::Str => "str",
            Type::Int
            | Type::Int8
            | Type::Int16
            | Type::Int32
            | Type::Uint8
            | Type::Uint16
            | Type::Uint32
            | Type::Uint64
            | Type::Size => "int",
            Type::Number => "number",
            Type::Bool => "bool",
            Type::Null => "null",
            Type::Any => "any",
            _ => return None,
        })
    }

    /// Whether a JSON value of this kind selects this alternate branch.
    fn accepts_kind(&self, v: &Json) -> bool {
        let number = matches!(v, Json::Int(_) | Json::UInt(_) | Json::Float(_));
        match self {
            Type::Str | Type::Enum(_) => matches!(v, Json::Str(_)),
            Type::Bool => matches!(v, Json::Bool(_)),
            Type::Null => matches!(v, Json::Null),
            Type::Number
            | Type::Int
            | Type::Int8
            | Type::Int16
            | Type::Int32
            | Type::Uint8
            | Type::Uint16
            | Type::Uint32
            | Type::Uint64
            | Type::Size => number,
            Type::Object(_) => matches!(v, Json::Object(_)),
            Type::Array(_) => matches!(v, Json::Array(_)),
            Type::Any => true,
            Type::Alternate(_) => false,
        }
    }
}

/// Where the visitor is: builds QEMU's "full name" of a member.
#[derive(Clone)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn full_name(path: &[Seg<'_>]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The plain name QEMU's core visitors print: the member name, or "null"
/// for list elements.
fn plain_name<'a>(path: &[Seg<'a>]) -> &'a str {
    match path.last() {
        Some(Seg::Key(k)) => k,
        _ => "null",
    }
}

fn type_err(path: &[Seg<'_>], expected: &str) -> String {
    format!(
        "Invalid parameter type for '{}', expected: {}",
        full_name(path),
        expected
    )
}

/// Checks `value` against `ty`; returns QEMU's error text for the first
/// problem.
pub fn check_value(ty: &Type, value: &Json) -> Result<(), String> {
    let mut path = Vec::new();
    visit(ty, value, &mut path)
}

/// Checks a command's `arguments` object against its argument type.
pub fn check_args(args_ty: &ObjectType, args: &Json) -> Result<(), String> {
    let mut path = Vec::new();
    visit_object(args_ty, args, &mut path)
}

fn visit<'a>(ty: &'a Type, v: &'a Json, path: &mut Vec<Seg<'a>>) -> Result<(), String> {
    let int_range = |lo: i64, hi: i64, cname: &str, path: &[Seg<'_>]| -> Result<(), String> {
        match v {
            Json::Int(i) if *i >= lo && *i <= hi => Ok(()),
            Json::Int(_) => Err(format!(
                "Parameter '{}' expects {}",
                plain_name(path),
                cname
            )),
            _ => Err(type_err(path, "integer")),
        }
    };
    let uint_range = |hi: u64, cname: &str, path: &[Seg<'_>]| -> Result<(), String> {
        let u = match v {
            Json::Int(i) => *i as u64,
            Json::UInt(u) => *u,
            _ => return Err(format!("Parameter '{}' expects uint64", full_name(path))),
        };
        if u > hi {
            return Err(format!(
                "Parameter '{}' expects {}",
                plain_name(path),
                cname
            ));
        }
        Ok(())
    };
    match ty {
        Type::Str => match v {
            Json::Str(_) => Ok(()),
            _ => Err(type_err(path, "string")),
        },
        Type::Int => int_range(i64::MIN, i64::MAX, "int64_t", path),
        Type::Int8 => int_range(i8::MIN.into(), i8::MAX.into(), "int8_t", path),
        Type::Int16 => int_range(i16::MIN.into(), i16::MAX.into(), "int16_t", path),
        Type::Int32 => int_range(i32::MIN.into(), i32::MAX.into(), "int32_t", path),
        Type::Uint8 => uint_range(u8::MAX.into(), "uint8_t", path),
        Type::Uint16 => uint_range(u16::MAX.into(), "uint16_t", path),
        Type::Uint32 => uint_range(u32::MAX.into(), "uint32_t", path),
        Type::Uint64 | Type::Size => uint_range(u64::MAX, "uint64_t", path),
        Type::Number => match v {
            Json::Int(_) | Json::UInt(_) | Json::Float(_) => Ok(()),
            _ => Err(type_err(path, "number")),
        },
        Type::Bool => match v {
            Json::Bool(_) => Ok(()),
            _ => Err(type_err(path, "boolean")),
        },
        Type::Null => match v {
            Json::Null => Ok(()),
            _ => Err(type_err(path, "null")),
        },
        Type::Any => Ok(()),
        Type::Enum(e) => match v {
            Json::Str(s) if e.values.iter().any(|x| x == s) => Ok(()),
            Json::Str(s) => Err(format!(
                "Parameter '{}' does not accept value '{}'",
                plain_name(path),
                s
            )),
            _ => Err(type_err(path, "string")),
        },
        Type::Array(elem) => match v {
            Json::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    visit(elem, item, path)?;
                    path.pop();
                }
                Ok(())
            }
            _ => Err(type_err(path, "array")),
        },
        Type::Object(o) => visit_object(o, v, path),
        Type::Alternate(a) => match a.branches.iter().find(|b| b.accepts_kind(v)) {
            Some(b) => visit(b, v, path),
            None => Err(format!(
                "Invalid parameter type for '{}', expected: {}",
                plain_name(path),
                a.name
            )),
        },
    }
}

fn visit_object<'a>(o: &'a ObjectType, v: &'a Json, path: &mut Vec<Seg<'a>>) -> Result<(), String> {
    let Json::Object(members) = v else {
        return Err(type_err(path, "object"));
    };
    let mut seen: Vec<&str> = Vec::new();
    let visit_members = |list: &'a [Member], path: &mut Vec<Seg<'a>>, seen: &mut Vec<&'a str>| {
        for m in list {
            path.push(Seg::Key(&m.name));
            match v.get(&m.name) {
                Some(val) => {
                    seen.push(&m.name);
                    visit(&m.ty, val, path)?;
                }
                None if m.optional => {}
                None => {
                    return Err(format!("Parameter '{}' is missing", full_name(path)));
                }
            }
            path.pop();
        }
        Ok(())
    };
    visit_members(&o.members, path, &mut seen)?;
    if let Some(var) = &o.variants {
        if let Some(Json::Str(tag)) = v.get(&var.tag) {
            if let Some((_, case)) = var.cases.iter().find(|(k, _)| k == tag) {
                visit_members(&case.members, path, &mut seen)?;
            }
        }
    }
    for i in crate::output::qdict_order(members) {
        let k = &members[i].0;
        if !seen.iter().any(|s| s == k) {
            path.push(Seg::Key(k));
            return Err(format!("Parameter '{}' is unexpected", full_name(path)));
        }
    }
    Ok(())
}

/// Builds `query-qmp-schema` entries, naming compound types with numbers in
/// the order they are first referenced, as QEMU does.
#[derive(Default)]
pub struct SchemaWriter {
    entities: Vec<Json>,
    types: Vec<Json>,
    names: HashMap<usize, String>,
    builtins: Vec<&'static str>,
    arrays: std::collections::HashSet<String>,
    next: usize,
}

fn obj(members: Vec<(&str, Json)>) -> Json {
    Json::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn s(v: &str) -> Json {
    Json::Str(v.to_string())
}

impl SchemaWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a command entry.
    pub fn command(
        &mut self,
        name: &str,
        args: &Arc<ObjectType>,
        ret: &Type,
        allow_oob: bool,
        features: &[String],
    ) {
        let arg = self.object_name(args);
        let ret = self.type_name(ret);
        let mut m = vec![
            ("name", s(name)),
            ("meta-type", s("command")),
            ("arg-type", s(&arg)),
            ("ret-type", s(&ret)),
        ];
        if allow_oob {
            m.push(("allow-oob", Json::Bool(true)));
        }
        if !features.is_empty() {
            m.push((
                "features",
                Json::Array(features.iter().map(|f| s(f)).collect()),
            ));
        }
        self.entities.push(obj(m));
    }

    /// Adds an event entry.
    pub fn event(&mut self, name: &str, data: &Arc<ObjectType>) {
        let arg = self.object_name(data);
        self.entities.push(obj(vec![
            ("name", s(name)),
            ("meta-type", s("event")),
            ("arg-type", s(&arg)),
        ]));
    }

    /// All entries: commands and events, then the types they use.
    pub fn finish(mut self) -> Json {
        let mut all = std::mem::take(&mut self.entities);
        all.append(&mut self.types);
        for b in &self.builtins {
            let json_type = match *b {
                "str" => "string",
                "int" => "int",
                "number" => "number",
                "bool" => "boolean",
                "null" => "null",
                _ => "value",
            };
            all.push(obj(vec![
                ("name", s(b)),
                ("meta-type", s("builtin")),
                ("json-type", s(json_type)),
            ]));
        }
        Json::Array(all)
    }

    fn fresh(&mut self, key: usize) -> (String, bool) {
        if let Some(n) = self.names.get(&key) {
            return (n.clone(), false);
        }
        let n = self.next.to_string();
        self.next += 1;
        self.names.insert(key, n.clone());
        (n, true)
    }

    fn object_name(&mut self, o: &Arc<ObjectType>) -> String {
        // QEMU introspects every member-less struct as one shared type.
        let key = if o.members.is_empty() && o.variants.is_none() {
            0
        } else {
            Arc::as_ptr(o) as *const u8 as usize
        };
        let (name, new) = self.fresh(key);
        if new {
            let slot = self.types.len();
            self.types.push(Json::Null);
            let mut members = Vec::new();
            for m in &o.members {
                let t = self.type_name(&m.ty);
                let mut e = vec![("name", s(&m.name))];
                if m.optional {
                    e.push(("default", Json::Null));
                }
                e.push(("type", s(&t)));
                if !m.features.is_empty() {
                    e.push((
                        "features",
                        Json::Array(m.features.iter().map(|f| s(f)).collect()),
                    ));
                }
                members.push(obj(e));
            }
            let mut e = vec![("name", s(&name)), ("members", Json::Array(members))];
            if let Some(v) = &o.variants {
                let mut cases = Vec::new();
                for (case, t) in &v.cases {
                    let tn = self.object_name(t);
                    cases.push(obj(vec![("case", s(case)), ("type", s(&tn))]));
                }
                e.push(("tag", s(&v.tag)));
                e.push(("variants", Json::Array(cases)));
            }
            e.push(("meta-type", s("object")));
            self.types[slot] = obj(e);
        }
        name
    }

    fn type_name(&mut self, t: &Type) -> String {
        if let Some(b) = t.builtin_name() {
            if !self.builtins.contains(&b) {
                self.builtins.push(b);
            }
            return b.to_string();
        }
        match t {
            Type::Object(o) => self.object_name(o),
            Type::Array(elem) => {
                let en = self.type_name(elem);
                let name = format!("[{en}]");
                if self.arrays.insert(name.clone()) {
                    self.types.push(obj(vec![
                        ("name", s(&name)),
                        ("meta-type", s("array")),
                        ("element-type", s(&en)),
                    ]));
                }
                name
            }
            Type::Enum(e) => {
                let (name, new) = self.fresh(Arc::as_ptr(e) as *const u8 as usize);
                if new {
                    let members = e.values.iter().map(|v| obj(vec![("name", s(v))])).collect();
                    let values = e.values.iter().map(|v| s(v)).collect();
                    self.types.push(obj(vec![
                        ("name", s(&name)),
                        ("meta-type", s("enum")),
                        ("members", Json::Array(members)),
                        ("values", Json::Array(values)),
                    ]));
                }
                name
            }
            Type::Alternate(a) => {
                let (name, new) = self.fresh(Arc::as_ptr(a) as *const u8 as usize);
                if new {
                    let slot = self.types.len();
                    self.types.push(Json::Null);
                    let mut members = Vec::new();
                    for b in &a.branches {
                        let tn = self.type_name(b);
                        members.push(obj(vec![("type", s(&tn))]));
                    }
                    self.types[slot] = obj(vec![
                        ("name", s(&name)),
                        ("members", Json::Array(members)),
                        ("meta-type", s("alternate")),
                    ]);
                }
                name
            }
            _ => "any".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn bitmap_add() -> ObjectType {
        ObjectType::new("BlockDirtyBitmapAdd")
            .member("node", Type::Str)
            .member("name", Type::Str)
            .optional("granularity", Type::Uint32)
            .optional("persistent", Type::Bool)
    }

    fn err(o: &ObjectType, args: &str) -> String {
        check_args(o, &parse(args.as_bytes()).unwrap()).unwrap_err()
    }

    #[test]
    fn qemu_texts() {
        let o = bitmap_add();
        assert_eq!(err(&o, r#"{"node":"x"}"#), "Parameter 'name' is missing");
        assert_eq!(
            err(&o, r#"{"node":1,"name":"b"}"#),
            "Invalid parameter type for 'node', expected: string"
        );
        assert_eq!(
            err(&o, r#"{"node":null,"name":"b"}"#),
            "Invalid parameter type for 'node', expected: string"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","granularity":"s"}"#),
            "Parameter 'granularity' expects uint64"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","granularity":1.5}"#),
            "Parameter 'granularity' expects uint64"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","granularity":-1}"#),
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","granularity":4294967296}"#),
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","persistent":1}"#),
            "Invalid parameter type for 'persistent', expected: boolean"
        );
        assert_eq!(
            err(&o, r#"{"node":"x","name":"b","foo":1}"#),
            "Parameter 'foo' is unexpected"
        );
        assert!(check_args(
            &o,
            &parse(br#"{"node":"x","name":"b","granularity":65536}"#).unwrap()
        )
        .is_ok());
    }

    #[test]
    fn nested_names() {
        let bm = ObjectType::new("BlockDirtyBitmap")
            .member("node", Type::Str)
            .member("name", Type::Str)
            .into_type();
        let alt = Type::alternate("BlockDirtyBitmapOrStr", vec![Type::Str, bm]);
        let merge = ObjectType::new("m")
            .member("node", Type::Str)
            .member("target", Type::Str)
            .member("bitmaps", Type::array(alt));
        assert_eq!(
            err(&merge, r#"{"node":"x","target":"b","bitmaps":[1]}"#),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
        );
        assert_eq!(
            err(&merge, r#"{"node":"x","target":"b","bitmaps":{}}"#),
            "Invalid parameter type for 'bitmaps', expected: array"
        );
        assert_eq!(
            err(
                &merge,
                r#"{"node":"x","target":"b","bitmaps":[{"node":"a"}]}"#
            ),
            "Parameter 'bitmaps[0].name' is missing"
        );
        let cache = ObjectType::new("c")
            .optional("direct", Type::Bool)
            .into_type();
        let aio = Type::enumeration("BlockdevAioOptions", &["threads", "native"]);
        let file = ObjectType::new("f")
            .member("filename", Type::Str)
            .optional("aio", aio)
            .optional("cache", cache);
        let add = ObjectType::new("BlockdevOptions")
            .member(
                "driver",
                Type::enumeration("BlockdevDriver", &["file", "null-co"]),
            )
            .optional("node-name", Type::Str)
            .variants("driver", vec![("file".into(), file)]);
        assert_eq!(
            err(&add, r#"{"driver":"nope"}"#),
            "Parameter 'driver' does not accept value 'nope'"
        );
        assert_eq!(
            err(&add, r#"{"driver":"file","filename":"x","aio":"x"}"#),
            "Parameter 'aio' does not accept value 'x'"
        );
        assert_eq!(
            err(
                &add,
                r#"{"driver":"file","filename":"x","cache":{"direct":"x"}}"#
            ),
            "Invalid parameter type for 'cache.direct', expected: boolean"
        );
        assert_eq!(
            err(&add, r#"{"driver":"file","filename":"x","cache":{"zz":1}}"#),
            "Parameter 'cache.zz' is unexpected"
        );
        assert_eq!(
            err(&add, r#"{"driver":"file","filename":"x","cache":1}"#),
            "Invalid parameter type for 'cache', expected: object"
        );
        assert_eq!(
            err(&add, r#"{"node-name":"a"}"#),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            err(&add, r#"{"driver":"null-co","filename":"x"}"#),
            "Parameter 'filename' is unexpected"
        );
    }
}
