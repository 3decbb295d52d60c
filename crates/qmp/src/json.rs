//! JSON as QEMU's QMP monitor reads it.
//!
//! QEMU splits its input with a byte-level lexer, groups the tokens of one
//! top-level value by counting braces and brackets, and only then parses the
//! group. This module follows the same model so that errors, their texts and
//! the resynchronisation after garbage behave like QEMU's:
//!
//! * single-quoted strings and the `\'` escape are accepted;
//! * a lexical error produces `JSON parse error, stray '<token>'`, after which
//!   input is skipped up to the next structural character or control
//!   character (the documented way to resynchronise);
//! * a value may hold at most 64 MiB of token text, 2 Mi tokens and nest 1024
//!   deep, otherwise the value is dropped with QEMU's limit error;
//! * strings are modified UTF-8: `\u0000` and `C0 80` are allowed, surrogates,
//!   overlong forms and noncharacters are not.

use std::fmt;

/// Largest total token text of one value, and of one token (QEMU: 64 MiB).
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Largest number of tokens in one value (QEMU: 2 Mi).
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of objects and arrays (QEMU: 1024).
pub const MAX_NESTING: i64 = 1 << 10;

/// A JSON value with QEMU's number model and object member order kept.
///
/// Integers that fit `i64` are `Int`, other non-negative integers that fit
/// `u64` are `UInt`, everything else is `Float`. Objects keep insertion order,
/// which matters for output ordering (see [`crate::output`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    /// A floating-point number (may be infinite after parsing `1e400`).
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, members in insertion order, keys unique.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The member `key` of an object, if this is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Converts from a `serde_json` value (object members in its map order).
    pub fn from_serde(v: &serde_json::Value) -> Json {
        use serde_json::Value as V;
        match v {
            V::Null => Json::Null,
            V::Bool(b) => Json::Bool(*b),
            V::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Json::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Json::UInt(u)
                } else {
                    Json::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            V::String(s) => Json::Str(s.clone()),
            V::Array(a) => Json::Array(a.iter().map(Json::from_serde).collect()),
            V::Object(m) => Json::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Json::from_serde(v)))
                    .collect(),
            ),
        }
    }

    /// Converts to a `serde_json` value. Non-finite floats become `null`.
    pub fn to_serde(&self) -> serde_json::Value {
        use serde_json::Value as V;
        match self {
            Json::Null => V::Null,
            Json::Bool(b) => V::Bool(*b),
            Json::Int(i) => V::from(*i),
            Json::UInt(u) => V::from(*u),
            Json::Float(f) => serde_json::Number::from_f64(*f)
                .map(V::Number)
                .unwrap_or(V::Null),
            Json::Str(s) => V::String(s.clone()),
            Json::Array(a) => V::Array(a.iter().map(Json::to_serde).collect()),
            Json::Object(m) => {
                V::Object(m.iter().map(|(k, v)| (k.clone(), v.to_serde())).collect())
            }
        }
    }

    /// The QAPI name of this value's JSON type, as used in introspection.
    pub fn json_type(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Int(_) | Json::UInt(_) | Json::Float(_) => "number",
            Json::Str(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::output::to_json_string(self))
    }
}

/// Token kinds produced by the lexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
    /// A token cut off by the per-token size limit (not a valid token).
    Cut,
}

/// Lexer states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    Recovery,
    DqStr,
    DqEsc,
    SqStr,
    SqEsc,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
}

/// What one input byte does in a state.
enum Step {
    /// Consume the byte and move to a state.
    Go(St),
    /// Consume the byte and finish a token.
    Emit(Tok),
    /// Finish a token without consuming the byte.
    EmitLookahead(Tok),
    /// Consume the byte as whitespace between tokens.
    Skip,
    /// Consume the byte and report a lexical error.
    Error,
    /// Leave recovery without consuming the byte.
    Resync,
    /// Consume the byte while recovering.
    Discard,
}

fn step(state: St, c: u8) -> Step {
    use Step::*;
    match state {
        St::Start => match c {
            b'"' => Go(St::DqStr),
            b'\'' => Go(St::SqStr),
            b'0' => Go(St::Zero),
            b'1'..=b'9' => Go(St::Digits),
            b'-' => Go(St::Sign),
            b'{' => Emit(Tok::LCurly),
            b'}' => Emit(Tok::RCurly),
            b'[' => Emit(Tok::LSquare),
            b']' => Emit(Tok::RSquare),
            b',' => Emit(Tok::Comma),
            b':' => Emit(Tok::Colon),
            b'a'..=b'z' => Go(St::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Skip,
            _ => Error,
        },
        St::Recovery => match c {
            b'\t' => Discard,
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Resync,
            _ => Discard,
        },
        St::DqStr => match c {
            b'\\' => Go(St::DqEsc),
            b'"' => Emit(Tok::Str),
            0x20..=0xfd => Go(St::DqStr),
            _ => Error,
        },
        St::SqStr => match c {
            b'\\' => Go(St::SqEsc),
            b'\'' => Emit(Tok::Str),
            0x20..=0xfd => Go(St::SqStr),
            _ => Error,
        },
        St::DqEsc => match c {
            0x20..=0xfd => Go(St::DqStr),
            _ => Error,
        },
        St::SqEsc => match c {
            0x20..=0xfd => Go(St::SqStr),
            _ => Error,
        },
        St::Zero => match c {
            b'0'..=b'9' => Error,
            b'.' => Go(St::Mantissa),
            _ => EmitLookahead(Tok::Integer),
        },
        St::ExpDigits => match c {
            b'0'..=b'9' => Go(St::ExpDigits),
            _ => EmitLookahead(Tok::Float),
        },
        St::ExpSign => match c {
            b'0'..=b'9' => Go(St::ExpDigits),
            _ => Error,
        },
        St::ExpE => match c {
            b'-' | b'+' => Go(St::ExpSign),
            b'0'..=b'9' => Go(St::ExpDigits),
            _ => Error,
        },
        St::MantissaDigits => match c {
            b'0'..=b'9' => Go(St::MantissaDigits),
            b'e' | b'E' => Go(St::ExpE),
            _ => EmitLookahead(Tok::Float),
        },
        St::Mantissa => match c {
            b'0'..=b'9' => Go(St::MantissaDigits),
            _ => Error,
        },
        St::Digits => match c {
            b'0'..=b'9' => Go(St::Digits),
            b'e' | b'E' => Go(St::ExpE),
            b'.' => Go(St::Mantissa),
            _ => EmitLookahead(Tok::Integer),
        },
        St::Sign => match c {
            b'0' => Go(St::Zero),
            b'1'..=b'9' => Go(St::Digits),
            _ => Error,
        },
        St::Keyword => match c {
            b'a'..=b'z' => Go(St::Keyword),
            _ => EmitLookahead(Tok::Keyword),
        },
    }
}

/// One message-level result of the stream: a parsed value or the error text
/// (the `desc` of the GenericError QEMU answers with).
pub type Message = Result<Json, String>;

/// Incremental QMP input parser: feed bytes, collect complete values.
///
/// Memory is bounded by the QEMU limits: one value's tokens hold at most
/// [`MAX_TOKEN_SIZE`] bytes of text (plus one token) before it is dropped.
#[derive(Debug)]
pub struct JsonStreamer {
    state: St,
    token: Vec<u8>,
    /// Tokens of the value being collected: kind and span in `text`.
    tokens: Vec<(Tok, usize, usize)>,
    text: Vec<u8>,
    brace: i64,
    bracket: i64,
    token_size: usize,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer in its initial state.
    pub fn new() -> Self {
        JsonStreamer {
            state: St::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            text: Vec::new(),
            brace: 0,
            bracket: 0,
            token_size: 0,
        }
    }

    /// Feeds bytes; complete messages are appended to `out`.
    pub fn feed(&mut self, buf: &[u8], out: &mut Vec<Message>) {
        for &c in buf {
            self.feed_byte(c, out);
        }
    }

    fn feed_byte(&mut self, c: u8, out: &mut Vec<Message>) {
        loop {
            match step(self.state, c) {
                Step::Go(s) => {
                    self.token.push(c);
                    self.state = s;
                    break;
                }
                Step::Emit(t) => {
                    self.token.push(c);
                    self.finish_token(t, out);
                    break;
                }
                Step::EmitLookahead(t) => {
                    self.finish_token(t, out);
                    // re-examine c in the start state
                }
                Step::Skip => {
                    self.token.clear();
                    self.state = St::Start;
                    break;
                }
                Step::Error => {
                    self.token.push(c);
                    self.take_token(Tok::Cut, true, out);
                    self.state = St::Recovery;
                    break;
                }
                Step::Resync => {
                    self.token.clear();
                    self.state = St::Start;
                }
                Step::Discard => {
                    self.token.clear();
                    break;
                }
            }
        }
        if self.token.len() > MAX_TOKEN_SIZE {
            self.take_token(Tok::Cut, false, out);
            self.state = St::Start;
        }
    }

    fn finish_token(&mut self, t: Tok, out: &mut Vec<Message>) {
        self.take_token(t, false, out);
        self.state = St::Start;
    }

    /// Hands the current token to the message layer and empties it, keeping
    /// a small buffer for the next token.
    fn take_token(&mut self, t: Tok, lexical_error: bool, out: &mut Vec<Message>) {
        let text = std::mem::take(&mut self.token);
        self.process(t, &text, lexical_error, out);
        if text.capacity() <= 64 * 1024 {
            self.token = text;
            self.token.clear();
        }
    }

    fn reset(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        if self.text.capacity() > (1 << 20) {
            self.tokens = Vec::new();
            self.text = Vec::new();
        } else {
            self.tokens.clear();
            self.text.clear();
        }
        self.token_size = 0;
    }

    fn process(&mut self, t: Tok, text: &[u8], lexical_error: bool, out: &mut Vec<Message>) {
        if lexical_error {
            // C strings end at a NUL byte; invalid UTF-8 shows as U+FFFD.
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            let shown = String::from_utf8_lossy(&text[..end]);
            out.push(Err(format!("JSON parse error, stray '{shown}'")));
            self.reset();
            return;
        }
        match t {
            Tok::LCurly => self.brace += 1,
            Tok::RCurly => self.brace -= 1,
            Tok::LSquare => self.bracket += 1,
            Tok::RSquare => self.bracket -= 1,
            _ => {}
        }
        self.token_size += text.len();
        let start = self.text.len();
        self.text.extend_from_slice(text);
        self.tokens.push((t, start, self.text.len()));
        if self.brace < 0 || self.bracket < 0 || (self.brace == 0 && self.bracket == 0) {
            out.push(parse_tokens(&self.tokens, &self.text));
            self.reset();
        } else if self.token_size > MAX_TOKEN_SIZE {
            out.push(Err("JSON token size limit exceeded".into()));
            self.reset();
        } else if self.tokens.len() > MAX_TOKEN_COUNT {
            out.push(Err("JSON token count limit exceeded".into()));
            self.reset();
        } else if self.brace + self.bracket > MAX_NESTING {
            out.push(Err("JSON nesting depth limit exceeded".into()));
            self.reset();
        }
    }
}

/// Parses one complete JSON text (convenience for tests and tools).
pub fn parse(text: &[u8]) -> Message {
    let mut s = JsonStreamer::new();
    let mut out = Vec::new();
    s.feed(text, &mut out);
    s.feed(b"\n", &mut out);
    if out.is_empty() && !s.tokens.is_empty() {
        // End of input inside a value: parse what there is, as QEMU's flush does,
        // so that the first real problem is reported.
        out.push(parse_tokens(&s.tokens, &s.text));
    }
    out.into_iter()
        .next()
        .unwrap_or_else(|| Err("JSON parse error, premature EOI".into()))
}

struct Parser<'a> {
    toks: &'a [(Tok, usize, usize)],
    text: &'a [u8],
    pos: usize,
}

fn perr(msg: impl fmt::Display) -> String {
    format!("JSON parse error, {msg}")
}

fn parse_tokens(toks: &[(Tok, usize, usize)], text: &[u8]) -> Message {
    let mut p = Parser { toks, text, pos: 0 };
    p.value()
}

impl Parser<'_> {
    fn peek(&self) -> Result<Tok, String> {
        self.toks
            .get(self.pos)
            .map(|t| t.0)
            .ok_or_else(|| perr("premature EOI"))
    }

    fn pop(&mut self) -> Result<(Tok, &[u8]), String> {
        let t = self
            .toks
            .get(self.pos)
            .ok_or_else(|| perr("premature EOI"))?;
        self.pos += 1;
        Ok((t.0, &self.text[t.1..t.2]))
    }

    fn value(&mut self) -> Message {
        match self.peek()? {
            Tok::LCurly => self.object(),
            Tok::LSquare => self.array(),
            Tok::Integer | Tok::Float | Tok::Str | Tok::Keyword => {
                let (t, text) = self.pop()?;
                literal(t, text)
            }
            _ => Err(perr("expecting value")),
        }
    }

    fn object(&mut self) -> Message {
        self.pop()?;
        let mut members: Vec<(String, Json)> = Vec::new();
        if self.peek()? == Tok::RCurly {
            self.pop()?;
            return Ok(Json::Object(members));
        }
        loop {
            let key = match self.value()? {
                Json::Str(s) => s,
                _ => return Err(perr("key is not a string in object")),
            };
            if self.pop()?.0 != Tok::Colon {
                return Err(perr("missing : in object pair"));
            }
            let value = self.value()?;
            if members.iter().any(|(k, _)| *k == key) {
                return Err(perr("duplicate key"));
            }
            members.push((key, value));
            match self.pop()?.0 {
                Tok::RCurly => return Ok(Json::Object(members)),
                Tok::Comma => {}
                _ => return Err(perr("expected separator in dict")),
            }
        }
    }

    fn array(&mut self) -> Message {
        self.pop()?;
        let mut items = Vec::new();
        if self.peek()? == Tok::RSquare {
            self.pop()?;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            match self.pop()?.0 {
                Tok::RSquare => return Ok(Json::Array(items)),
                Tok::Comma => {}
                _ => return Err(perr("expected separator in list")),
            }
        }
    }
}

fn literal(t: Tok, text: &[u8]) -> Message {
    // Number and keyword tokens are ASCII by construction of the lexer.
    let s = std::str::from_utf8(text).unwrap_or("");
    match t {
        Tok::Keyword => match s {
            "true" => Ok(Json::Bool(true)),
            "false" => Ok(Json::Bool(false)),
            "null" => Ok(Json::Null),
            _ => Err(perr(format_args!("invalid keyword '{s}'"))),
        },
        Tok::Integer => {
            if let Ok(i) = s.parse::<i64>() {
                Ok(Json::Int(i))
            } else if let Ok(u) = s.parse::<u64>() {
                Ok(Json::UInt(u))
            } else {
                Ok(Json::Float(s.parse::<f64>().unwrap_or(0.0)))
            }
        }
        Tok::Float => Ok(Json::Float(s.parse::<f64>().unwrap_or(0.0))),
        Tok::Str => parse_string(text).map(Json::Str),
        _ => Err(perr("expecting value")),
    }
}

fn hex4(b: &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    let mut v = 0u32;
    for &c in &b[..4] {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

/// Whether QEMU accepts the code point in a string.
fn valid_codepoint(cp: u32) -> bool {
    !((0xd800..=0xdfff).contains(&cp)
        || cp > 0x10ffff
        || (0xfdd0..=0xfdef).contains(&cp)
        || (cp & 0xfffe) == 0xfffe)
}

/// Decodes one modified-UTF-8 sequence at the start of `b`; returns the code
/// point and its length, or `None` if invalid.
fn mod_utf8(b: &[u8]) -> Option<(u32, usize)> {
    let c = b[0];
    let (len, init, min) = match c {
        0x00..=0x7f => return Some((c as u32, 1)),
        0xc0..=0xdf => (2, (c & 0x1f) as u32, 0x80),
        0xe0..=0xef => (3, (c & 0x0f) as u32, 0x800),
        0xf0..=0xf7 => (4, (c & 0x07) as u32, 0x10000),
        _ => return None,
    };
    if b.len() < len {
        return None;
    }
    let mut cp = init;
    for &cc in &b[1..len] {
        if cc & 0xc0 != 0x80 {
            return None;
        }
        cp = (cp << 6) | (cc & 0x3f) as u32;
    }
    // Modified UTF-8 spells U+0000 as C0 80; other overlong forms are invalid.
    if cp < min && !(len == 2 && cp == 0) {
        return None;
    }
    if !valid_codepoint(cp) {
        return None;
    }
    Some((cp, len))
}

/// Unescapes a string token (with its quotes) the way QEMU does.
fn parse_string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let body = &tok[1..];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != quote {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            i += 1;
            let e = body.get(i).copied().unwrap_or(0);
            i += 1;
            let ch = match e {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let shown = |end: usize| {
                        let end = end.min(tok.len() - 1);
                        String::from_utf8_lossy(&body[beg..end]).into_owned()
                    };
                    let mut cp = hex4(&body[i..]).map(|v| v as i64).unwrap_or(-1);
                    i += 4;
                    if (0xd800..=0xdbff).contains(&cp)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        match hex4(body.get(i + 2..).unwrap_or(&[])) {
                            Some(lo) if (0xdc00..=0xdfff).contains(&lo) => {
                                cp = 0x10000 + ((cp & 0x3ff) << 10) + (lo as i64 & 0x3ff);
                                i += 6;
                            }
                            _ => cp = -1,
                        }
                    }
                    let valid = cp >= 0 && valid_codepoint(cp as u32);
                    match char::from_u32(cp as u32) {
                        Some(ch) if valid => ch,
                        _ => {
                            return Err(perr(format_args!(
                                "{} is not a valid Unicode character",
                                shown(beg + 6)
                            )))
                        }
                    }
                }
                _ => return Err(perr("invalid escape sequence in string")),
            };
            out.push(ch);
        } else {
            match mod_utf8(&body[i..]) {
                Some((cp, len)) => {
                    // valid_codepoint() excluded everything char rejects
                    out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                    i += len;
                }
                None => return Err(perr("invalid UTF-8 sequence in string")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(input: &[u8]) -> Vec<Message> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn errs(input: &[u8]) -> Vec<String> {
        msgs(input)
            .into_iter()
            .map(|m| match m {
                Ok(v) => format!("ok {v}"),
                Err(e) => e,
            })
            .collect()
    }

    #[test]
    fn values_and_numbers() {
        let v = parse(br#"{"a": [1, -0, 1.5, 18446744073709551615, 18446744073709551616, true, null], 'b': 'x\'y'}"#).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&Json::Array(vec![
                Json::Int(1),
                Json::Int(0),
                Json::Float(1.5),
                Json::UInt(u64::MAX),
                Json::Float(18446744073709551616.0),
                Json::Bool(true),
                Json::Null
            ]))
        );
        assert_eq!(v.get("b"), Some(&Json::Str("x'y".into())));
    }

    #[test]
    fn parse_error_texts() {
        assert_eq!(
            errs(b"{\"execute\":}"),
            ["JSON parse error, expecting value"]
        );
        assert_eq!(errs(b"}"), ["JSON parse error, expecting value"]);
        assert_eq!(
            errs(b"{\"a\":1 \"b\":1}"),
            ["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            errs(b"[1 2]"),
            ["JSON parse error, expected separator in list"]
        );
        assert_eq!(
            errs(b"{\"a\" 1}"),
            ["JSON parse error, missing : in object pair"]
        );
        assert_eq!(
            errs(b"{1:1}"),
            ["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            errs(b"{\"a\":1,\"a\":2}"),
            ["JSON parse error, duplicate key"]
        );
        assert_eq!(
            errs(b"garbage "),
            ["JSON parse error, invalid keyword 'garbage'"]
        );
        assert_eq!(errs(b"\x01"), ["JSON parse error, stray '\u{1}'"]);
        assert_eq!(
            errs(b"{\"a\":01}\n"),
            [
                "JSON parse error, stray '01'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(errs(b"{\"a\":-}\n"), ["JSON parse error, stray '-}'"]);
        assert_eq!(
            errs(b"{\"a\":\"\xff\"}\n"),
            [
                "JSON parse error, stray '\"\u{fffd}'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs(b"{\"a\":\x00}"),
            [
                "JSON parse error, stray ''",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs(b"[[[]]]]"),
            ["ok [[[]]]", "JSON parse error, expecting value"]
        );
    }

    #[test]
    fn string_errors() {
        let e = |s: &[u8]| parse(s).unwrap_err();
        assert_eq!(
            e(b"\"\\u12\""),
            "JSON parse error, \\u12\" is not a valid Unicode character"
        );
        assert_eq!(
            e(b"\"\\ud800\\u0041\""),
            "JSON parse error, \\ud800 is not a valid Unicode character"
        );
        assert_eq!(
            e(b"\"\\udc00\""),
            "JSON parse error, \\udc00 is not a valid Unicode character"
        );
        assert_eq!(
            e(b"\"\\x\""),
            "JSON parse error, invalid escape sequence in string"
        );
        for bad in [
            &b"\"\xed\xa0\x80\""[..],
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe0\x80\x80\"",
            b"\"\xc3\"",
            b"\"\xef\xbf\xbf\"",
        ] {
            assert_eq!(e(bad), "JSON parse error, invalid UTF-8 sequence in string");
        }
        assert_eq!(
            parse(b"\"\xc0\x80\\u0000\\ud83d\\ude00\"").unwrap(),
            Json::Str("\0\0\u{1f600}".into())
        );
    }

    #[test]
    fn recovery_and_limits() {
        let m = errs(b"{\"a\":1} garbage {\"b\":2}");
        assert_eq!(
            m,
            [
                "ok {\"a\": 1}",
                "JSON parse error, invalid keyword 'garbage'",
                "ok {\"b\": 2}"
            ]
        );
        let deep = vec![b'['; 1100];
        assert_eq!(errs(&deep), ["JSON nesting depth limit exceeded"]);
        let mut ok = vec![b'['; 1024];
        ok.extend(vec![b']'; 1024]);
        assert!(msgs(&ok)[0].is_ok());
    }

    #[test]
    fn split_feeding_is_equivalent() {
        let input = br#"{"execute": "x", "arguments": {"s": "h\u00e9llo", "n": 12345}}"#;
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        for b in input.iter() {
            s.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, msgs(input));
    }

    /// A small deterministic generator (xorshift) for the randomised test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics_and_chunking_does_not_matter() {
        const PIECES: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b":",
            b",",
            b"\"",
            b"'",
            b"\\",
            b"\\u",
            b"d800",
            b"00e9",
            b"1",
            b"-",
            b"0",
            b".",
            b"e",
            b"+",
            b"true",
            b"nul",
            b"x",
            b" ",
            b"\n",
            b"\t",
            b"\x01",
            b"\xff",
            b"\xc3\xa9",
            b"\xed\xa0\x80",
            b"\xc0\x80",
            b"\"execute\"",
            b"\"id\"",
            b"{\"execute\":\"q\",\"id\":1}",
            b"\x00",
            b"\xf0\x9f\x98\x80",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let mut input = Vec::new();
            for _ in 0..rng.below(40) {
                input.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
            let whole = msgs(&input);
            let mut s = JsonStreamer::new();
            let mut split = Vec::new();
            let mut pos = 0;
            while pos < input.len() {
                let n = 1 + rng.below(7).min(input.len() - pos - 1);
                s.feed(&input[pos..pos + n], &mut split);
                pos += n;
            }
            assert_eq!(whole, split, "input {input:?}");
            for m in whole.iter().flatten() {
                // everything parsed prints as ASCII, and printing is a fixed
                // point (floats like 1e11 come back as integers, as in QEMU)
                let text = crate::output::to_json_string(m);
                assert!(text.is_ascii());
                if !text.contains("inf") && !text.contains("nan") {
                    let again = parse(text.as_bytes()).expect("output parses");
                    assert_eq!(crate::output::to_json_string(&again), text);
                }
            }
        }
    }
}
