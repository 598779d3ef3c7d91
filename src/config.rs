//! The configuration file: TOML with any number of `[[tcp_proxy]]` and `[[ws_proxy]]` sections,
//! each its own listener.
//!
//! The section fields read as rws documents them, so an rws user's sections load unchanged:
//!
//! ```toml
//! [[tcp_proxy]]
//! name = "postgres"
//! listen = "0.0.0.0:5432"          # `bind` is accepted too
//! backends = ["db-1:5432", "db-2:5432"]
//! connect_timeout_ms = 3000        # default 5000
//!
//! [[ws_proxy]]
//! name = "chat"
//! listen = "0.0.0.0:8080"
//! backends = ["chat-1:9000", "ws://chat-2:9000"]
//! connect_timeout_ms = 3000        # default 5000
//! read_timeout_ms = 30000          # default 30000; bounds reading the request head only
//! ```
//!
//! Loading is two passes: serde with `deny_unknown_fields` for the shape, then
//! [`validate`](Config::parse) for meaning. Every error names the file, the line and column, the
//! section, the field and the fix.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::tcp::DEFAULT_CONNECT_TIMEOUT_MS;
use crate::Error;

/// How long a WebSocket client may take to send its request head when none is configured, as
/// in rws. It never applies to an established tunnel.
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;

/// A validated configuration: every section is ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `[[tcp_proxy]]` sections, in file order.
    pub tcp_proxy: Vec<TcpSection>,
    /// The `[[ws_proxy]]` sections, in file order.
    pub ws_proxy: Vec<WsSection>,
}

/// One `[[tcp_proxy]]` section: a listener whose connections are tunnelled to `backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSection {
    /// Names the section in logs; defaults to `tcp-N` for the N-th section.
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// `host:port` of each backend.
    pub backends: Vec<String>,
    /// How long one connect to one backend may take.
    pub connect_timeout_ms: u64,
}

/// One `[[ws_proxy]]` section: a listener for WebSocket upgrades.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSection {
    /// Names the section in logs; defaults to `ws-N` for the N-th section.
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// `host:port` or `ws://host:port[/path]` of each backend.
    pub backends: Vec<String>,
    /// How long one connect to one backend may take.
    pub connect_timeout_ms: u64,
    /// How long a client may take to send its request head.
    pub read_timeout_ms: u64,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` (usually the file name) starts every message.
    pub fn parse(text: &str, origin: &str) -> Result<Config, Error> {
        let file = Source { text, origin };
        let raw: raw::File = toml::from_str(text).map_err(|e| file.shape_error(&e))?;
        file.validate(raw)
    }

    /// How many listeners this configuration runs.
    pub fn listeners(&self) -> usize {
        self.tcp_proxy.len() + self.ws_proxy.len()
    }
}

impl fmt::Display for Config {
    /// What would run, one line per listener.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.tcp_proxy {
            writeln!(
                f,
                "tcp_proxy {:?}: listen {} -> {} (connect_timeout_ms {})",
                s.name,
                s.listen,
                s.backends.join(", "),
                s.connect_timeout_ms
            )?;
        }
        for s in &self.ws_proxy {
            writeln!(
                f,
                "ws_proxy {:?}: listen {} -> {} (connect_timeout_ms {}, read_timeout_ms {})",
                s.name,
                s.listen,
                s.backends.join(", "),
                s.connect_timeout_ms,
                s.read_timeout_ms
            )?;
        }
        Ok(())
    }
}

/// The file's shape as serde sees it, with spans for every value a later check may blame.
mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct File {
        #[serde(default)]
        pub tcp_proxy: Vec<Spanned<Section>>,
        #[serde(default)]
        pub ws_proxy: Vec<Spanned<Section>>,
    }

    /// Both section kinds; fields only one kind has are rejected in validation, so the message
    /// can say which kind takes them.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Section {
        pub name: Option<Spanned<String>>,
        #[serde(alias = "bind")]
        pub listen: Spanned<String>,
        pub backends: Spanned<Vec<Spanned<String>>>,
        pub connect_timeout_ms: Option<Spanned<u64>>,
        pub read_timeout_ms: Option<Spanned<u64>>,
    }
}

/// The text being loaded and where it came from, for messages.
struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

/// Which kind of section a check is looking at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Ws,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp_proxy",
            Kind::Ws => "ws_proxy",
        }
    }
}

impl Source<'_> {
    /// 1-based line and column of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let before = &self.text[..at.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        (line, col)
    }

    /// The `[[table]]` header in force at byte offset `at`, with its ordinal: `[[tcp_proxy]] #2`.
    fn section_at(&self, at: usize) -> Option<String> {
        let mut found = None;
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            if offset > at {
                break;
            }
            let t = line.trim();
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let name = name.trim();
                let n = counts.entry(name).or_default();
                *n += 1;
                found = Some(format!("[[{name}]] #{n}"));
            } else if t.starts_with('[') {
                found = t.split(']').next().map(|h| format!("{h}]"));
            }
            offset += line.len();
        }
        found
    }

    /// A message naming the place, the section, the field, the problem and the fix.
    fn error(&self, span: Range<usize>, field: &str, problem: &str, fix: &str) -> Error {
        let (line, col) = self.position(span.start);
        let section = self
            .section_at(span.start)
            .map(|s| format!("{s}, "))
            .unwrap_or_default();
        let field = if field.is_empty() {
            String::new()
        } else {
            format!("field `{field}`: ")
        };
        Error::Config(format!(
            "{}:{line}:{col}: {section}{field}{problem}; fix: {fix}",
            self.origin
        ))
    }

    /// Turns a serde/TOML error into the same shape of message as a validation error.
    fn shape_error(&self, e: &toml::de::Error) -> Error {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim();
        let quoted = msg.split('`').nth(1).unwrap_or("");
        let (field, fix) = if msg.starts_with("unknown field") {
            (
                quoted.to_string(),
                format!("remove `{quoted}` or correct its spelling"),
            )
        } else if msg.starts_with("missing field") {
            (
                quoted.to_string(),
                format!("add `{quoted} = ...` to this section"),
            )
        } else if msg.starts_with("duplicate field") {
            let hint = if quoted == "listen" {
                " (`bind` is another name for `listen`)"
            } else {
                ""
            };
            (
                quoted.to_string(),
                format!("give `{quoted}` only once{hint}"),
            )
        } else {
            // A type or syntax error: blame the key on the offending line, if there is one.
            let (line, _) = self.position(span.start);
            let text = self.text.lines().nth(line - 1).unwrap_or("");
            let key = text.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
            let fix = if msg.contains("invalid type") {
                "give the value the type the message names (numbers unquoted, addresses quoted)"
            } else {
                "correct the TOML syntax at this position (strings need quotes)"
            };
            (key.to_string(), fix.to_string())
        };
        let problem = msg
            .lines()
            .next()
            .unwrap_or(msg)
            .split(", expected nothing")
            .next()
            .unwrap_or(msg);
        self.error(span, &field, problem, &fix)
    }

    fn validate(&self, raw: raw::File) -> Result<Config, Error> {
        let mut config = Config {
            tcp_proxy: Vec::new(),
            ws_proxy: Vec::new(),
        };
        // Listen address → the section that claimed it, to refuse a second claim.
        let mut listens: HashMap<String, String> = HashMap::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let sections = raw.tcp_proxy.into_iter().map(|s| (Kind::Tcp, s));
        let sections = sections.chain(raw.ws_proxy.into_iter().map(|s| (Kind::Ws, s)));
        let mut ordinal: HashMap<&str, usize> = HashMap::new();
        for (kind, section) in sections {
            let n = {
                let n = ordinal.entry(kind.table()).or_default();
                *n += 1;
                *n
            };
            let span = section.span();
            let s = section.into_inner();
            let default_name = format!("{}-{n}", if kind == Kind::Tcp { "tcp" } else { "ws" });
            let name = match &s.name {
                Some(name) if name.get_ref().trim().is_empty() => {
                    return Err(self.error(
                        name.span(),
                        "name",
                        "the name is empty",
                        "give the section a name, or leave `name` out",
                    ))
                }
                Some(name) => name.get_ref().clone(),
                None => default_name,
            };
            let blame = s.name.as_ref().map_or(span.clone(), Spanned::span);
            if let Some(first) = names.insert(name.clone(), format!("[[{}]] #{n}", kind.table())) {
                return Err(self.error(
                    blame,
                    "name",
                    &format!("the name {name:?} is already used by {first}"),
                    "give every section its own name, so log lines tell them apart",
                ));
            }

            let listen = s.listen.get_ref().trim().to_string();
            if let Err(why) = check_addr(&listen, true) {
                return Err(self.error(
                    s.listen.span(),
                    "listen",
                    &format!("{listen:?} is not a listen address: {why}"),
                    "write it as \"host:port\", e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
                ));
            }
            if let Some(first) = listens.insert(listen.to_ascii_lowercase(), name.clone()) {
                return Err(self.error(
                    s.listen.span(),
                    "listen",
                    &format!("{listen} is already the listen address of section {first:?}"),
                    "give each section its own address or port",
                ));
            }

            if s.backends.get_ref().is_empty() {
                return Err(self.error(
                    s.backends.span(),
                    "backends",
                    "no backends are listed",
                    "list at least one, e.g. backends = [\"127.0.0.1:9000\"]",
                ));
            }
            let mut backends = Vec::new();
            for b in s.backends.get_ref() {
                let addr = b.get_ref().trim();
                let bare = match kind {
                    Kind::Ws => addr
                        .strip_prefix("ws://")
                        .map_or(addr, |r| r.split('/').next().unwrap_or(r)),
                    Kind::Tcp => addr,
                };
                if let Err(why) = check_addr(bare, false) {
                    let form = match kind {
                        Kind::Tcp => "\"host:port\", e.g. \"10.0.0.5:5432\"",
                        Kind::Ws => {
                            "\"host:port\" or \"ws://host:port/path\", e.g. \"chat-1:9000\""
                        }
                    };
                    return Err(self.error(
                        b.span(),
                        "backends",
                        &format!("{addr:?} is not a backend address: {why}"),
                        &format!("write each backend as {form}"),
                    ));
                }
                backends.push(addr.to_string());
            }

            let connect_timeout_ms = self.timeout(
                &s.connect_timeout_ms,
                "connect_timeout_ms",
                DEFAULT_CONNECT_TIMEOUT_MS,
            )?;
            match kind {
                Kind::Tcp => {
                    if let Some(t) = &s.read_timeout_ms {
                        return Err(self.error(
                            t.span(),
                            "read_timeout_ms",
                            "a TCP tunnel has no request head to time out",
                            "remove `read_timeout_ms` from this [[tcp_proxy]] section",
                        ));
                    }
                    config.tcp_proxy.push(TcpSection {
                        name,
                        listen,
                        backends,
                        connect_timeout_ms,
                    });
                }
                Kind::Ws => {
                    let read_timeout_ms = self.timeout(
                        &s.read_timeout_ms,
                        "read_timeout_ms",
                        DEFAULT_READ_TIMEOUT_MS,
                    )?;
                    config.ws_proxy.push(WsSection {
                        name,
                        listen,
                        backends,
                        connect_timeout_ms,
                        read_timeout_ms,
                    });
                }
            }
        }
        Ok(config)
    }

    /// A timeout in milliseconds: absent means `default`; zero is refused.
    fn timeout(
        &self,
        value: &Option<Spanned<u64>>,
        field: &str,
        default: u64,
    ) -> Result<u64, Error> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Err(self.error(
                v.span(),
                field,
                "a timeout of 0 ms would fail every attempt",
                &format!("use a positive number of milliseconds (the default is {default}), or leave `{field}` out"),
            )),
            Some(v) => Ok(*v.get_ref()),
        }
    }
}

/// Checks that `addr` is `host:port`: a host name, an IPv4 address, or an IPv6 address in
/// brackets, and a port. Port 0 is allowed for listening only (the system picks a port, which
/// the start-up log line shows).
fn check_addr(addr: &str, listening: bool) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("there is no `:port`")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port (0-65535)"))?;
    if port == 0 && !listening {
        return Err("port 0 cannot be connected to".into());
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(drop)
            .map_err(|_| format!("{v6:?} is not an IPv6 address"));
    }
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets, e.g. \"[::1]:8080\"".into());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let cases: &[(&str, bool, bool)] = &[
            ("127.0.0.1:80", false, true),
            ("db-1:5432", false, true),
            ("db.internal.example:5432", false, true),
            ("[::1]:9000", false, true),
            ("0.0.0.0:0", true, true),
            ("0.0.0.0:0", false, false),
            ("localhost", false, false),
            (":80", false, false),
            ("host:99999", false, false),
            ("host:http", false, false),
            ("::1:80", false, false),
            ("[zz]:80", false, false),
            ("bad host:80", false, false),
            ("a..b:80", false, false),
        ];
        for &(addr, listening, ok) in cases {
            assert_eq!(
                check_addr(addr, listening).is_ok(),
                ok,
                "{addr} listening={listening}"
            );
        }
    }

    #[test]
    fn defaults_are_filled() {
        let c = Config::parse(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"b:2\"]\n\n[[ws_proxy]]\nbind = \"127.0.0.1:3\"\nbackends = [\"ws://w:4/x\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.tcp_proxy,
            [TcpSection {
                name: "tcp-1".into(),
                listen: "127.0.0.1:1".into(),
                backends: vec!["b:2".into()],
                connect_timeout_ms: 5000
            }]
        );
        assert_eq!(c.ws_proxy[0].name, "ws-1");
        assert_eq!(c.ws_proxy[0].read_timeout_ms, 30_000);
        assert_eq!(c.listeners(), 2);
    }

    #[test]
    fn messages_name_the_place() {
        let e = Config::parse(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = []\n",
            "f.toml",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.toml:3:12: [[tcp_proxy]] #1, field `backends`: no backends are listed; fix: list at least one, e.g. backends = [\"127.0.0.1:9000\"]"
        );
    }
}
