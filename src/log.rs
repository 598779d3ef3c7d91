//! Log lines on standard error: one line per event, `key=value` fields after a UTC timestamp,
//! so they read well in a terminal and split cleanly with `grep` and `awk`.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::thread::LocalKey;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one log line: the timestamp, the level, then `args`.
pub(crate) fn line(level: &str, args: fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Formatted into a buffer of the thread's, kept between lines: a line costs no allocation.
    with_buffer(&LINE, |text| {
        let _ = writeln!(text, "{} {level} {args}", Timestamp(now.as_millis() as u64));
        // One write per line, so lines from different threads never interleave; eprint!
        // rather than a raw stderr handle, so the test harness captures the lines of passing
        // tests.
        eprint!("{text}");
    });
}

/// Runs `f` with the thread's buffer `key`, emptied (or a new one, when that is in use or
/// gone), and keeps at most [`LINE_KEPT`] bytes of it afterwards.
fn with_buffer(key: &'static LocalKey<RefCell<String>>, f: impl FnOnce(&mut String)) {
    let mut f = Some(f);
    let _ = key.try_with(|cell| {
        if let (Ok(mut buf), Some(f)) = (cell.try_borrow_mut(), f.take()) {
            buf.clear();
            f(&mut buf);
            buf.shrink_to(LINE_KEPT);
        }
    });
    if let Some(f) = f {
        f(&mut String::new());
    }
}

/// The most a thread's line buffer keeps between lines.
const LINE_KEPT: usize = 1024;

std::thread_local! {
    /// The line being written ([`line`]), and the access line being put together
    /// ([`Access::write`]).
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    static ACCESS: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Milliseconds since the Unix epoch, shown as RFC 3339 UTC (`2026-11-22T07:40:00.123Z`).
struct Timestamp(u64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Logs an informational line: `info!("listening name={name}")`.
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line("INFO", format_args!($($arg)*)) };
}

/// Logs a warning line.
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::log::line("WARN", format_args!($($arg)*)) };
}

pub(crate) use {info, log_warn as warn};

/// Access lines as JSON objects (`log_format = "json"`) rather than `key=value` text.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A line when a tunnel opens too (`log_open = true`), not only when it ends.
static LOG_OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Access lines at all (`access_log = false` turns them off).
static ACCESS_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sets the process-wide access-log options.
pub(crate) fn configure(json: bool, log_open: bool, access_log: bool) {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    LOG_OPEN.store(log_open, std::sync::atomic::Ordering::Relaxed);
    ACCESS_LOG.store(access_log, std::sync::atomic::Ordering::Relaxed);
}

/// What one connection did, for its access-log line.
#[derive(Debug, Default)]
pub(crate) struct Access {
    /// `tcp` or `ws`.
    pub kind: &'static str,
    /// The section's name (shared with the section, not copied per connection).
    pub section: std::sync::Arc<str>,
    /// The WebSocket route's path prefix.
    pub route: Option<String>,
    /// The client, as its PROXY header says when there is one.
    pub client: Option<std::net::SocketAddr>,
    /// The backend that served it, if any.
    pub backend: Option<String>,
    /// The WebSocket request target.
    pub path: Option<String>,
    /// The HTTP status the client got (WebSocket).
    pub status: Option<u16>,
    /// The TLS version the client's connection speaks, when TLS ends here (`TLSv1.3`).
    pub tls: Option<&'static str>,
    /// Bytes to the backend and to the client.
    pub up: u64,
    pub down: u64,
    /// Time to a connected (and, for WebSocket, upgraded) backend.
    pub connect_ms: Option<u64>,
    pub duration_ms: u64,
    /// How it ended: `client closed`, `backend closed`, `idle timeout`, `refused: …`, ….
    pub end: String,
}

impl Access {
    /// Writes the line for a connection that ended, and counts its bytes and ending in the
    /// section's metrics.
    pub(crate) fn closed(&self, metrics: &crate::metrics::Section) {
        self.write("closed");
        metrics.closed(self);
    }

    /// [`closed`](Self::closed) for a tunnel whose bytes the metrics counted as they went.
    pub(crate) fn closed_counted(&self, metrics: &crate::metrics::Section) {
        self.write("closed");
        metrics.ended(self);
    }

    /// Writes the line for a tunnel that just opened, when `log_open` is on.
    pub(crate) fn opened(&self) {
        if LOG_OPEN.load(std::sync::atomic::Ordering::Relaxed) {
            self.write("opened");
        }
    }

    fn write(&self, event: &str) {
        if !ACCESS_LOG.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let json = JSON.load(std::sync::atomic::Ordering::Relaxed);
        with_buffer(&ACCESS, |out| {
            if json {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                self.render(event, Some(Timestamp(now.as_millis() as u64)), out);
                out.push('\n');
                eprint!("{out}");
            } else {
                self.render(event, None, out);
                line("INFO", format_args!("{out}"));
            }
        });
    }

    /// The line's text: `access key=value ...`, or a JSON object when `time` is given.
    fn render(&self, event: &str, time: Option<Timestamp>, out: &mut String) {
        let json = time.is_some();
        match time {
            Some(time) => {
                let _ = write!(out, "{{\"time\":\"{time}\"");
            }
            None => out.push_str("access"),
        }
        let text = |out: &mut String, name: &str, value: &str| {
            if json {
                let _ = write!(out, ",\"{name}\":\"");
                json_escape_into(out, value);
                out.push('"');
            } else if value.contains([' ', '"']) || value.is_empty() {
                let _ = write!(out, " {name}=\"");
                out.extend(value.chars().map(|c| if c == '"' { '\'' } else { c }));
                out.push('"');
            } else {
                let _ = write!(out, " {name}={value}");
            }
        };
        let number = |out: &mut String, name: &str, value: u64| {
            let _ = match json {
                true => write!(out, ",\"{name}\":{value}"),
                false => write!(out, " {name}={value}"),
            };
        };
        text(out, "event", event);
        text(out, "kind", self.kind);
        text(out, "section", &self.section);
        if let Some(route) = &self.route {
            text(out, "route", route);
        }
        if let Some(client) = self.client {
            // (An address needs neither quotes in text nor escapes in JSON.)
            let _ = match json {
                true => write!(out, ",\"client\":\"{client}\""),
                false => write!(out, " client={client}"),
            };
        }
        if let Some(backend) = &self.backend {
            text(out, "backend", backend);
        }
        if let Some(path) = &self.path {
            text(out, "path", path);
        }
        if let Some(status) = self.status {
            number(out, "status", status.into());
        }
        if let Some(tls) = self.tls {
            text(out, "tls", tls);
        }
        number(out, "up", self.up);
        number(out, "down", self.down);
        if let Some(c) = self.connect_ms {
            number(out, "connect_ms", c);
        }
        number(out, "duration_ms", self.duration_ms);
        if event == "closed" {
            text(out, "end", &self.end);
        }
        if json {
            out.push('}');
        }
    }
}

/// Appends `s` with JSON's string escapes.
fn json_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_escape_into(&mut out, "a\"b\\c\nd\u{1}");
        assert_eq!(out, "a\\\"b\\\\c\\nd\\u0001");
    }

    #[test]
    fn access_lines_quote_what_needs_it_as_text_and_as_json() {
        let mut access = Access {
            kind: "ws",
            section: "main".into(),
            route: Some("/chat".into()),
            client: Some("127.0.0.1:5000".parse().unwrap()),
            backend: Some("127.0.0.1:9000".into()),
            path: Some("/chat?a=b c".into()),
            status: Some(101),
            tls: Some("TLSv1.3"),
            up: 5,
            down: 7,
            connect_ms: Some(1),
            duration_ms: 12,
            end: "client closed".into(),
        };
        let render = |access: &Access, event, time| {
            let mut out = String::new();
            access.render(event, time, &mut out);
            out
        };
        assert_eq!(
            render(&access, "closed", None),
            "access event=closed kind=ws section=main route=/chat client=127.0.0.1:5000 \
             backend=127.0.0.1:9000 path=\"/chat?a=b c\" status=101 tls=TLSv1.3 up=5 down=7 \
             connect_ms=1 duration_ms=12 end=\"client closed\""
        );
        assert_eq!(
            render(&access, "closed", Some(Timestamp(0))),
            "{\"time\":\"1970-01-01T00:00:00.000Z\",\"event\":\"closed\",\"kind\":\"ws\",\
             \"section\":\"main\",\"route\":\"/chat\",\"client\":\"127.0.0.1:5000\",\
             \"backend\":\"127.0.0.1:9000\",\"path\":\"/chat?a=b c\",\"status\":101,\
             \"tls\":\"TLSv1.3\",\"up\":5,\"down\":7,\"connect_ms\":1,\"duration_ms\":12,\
             \"end\":\"client closed\"}"
        );
        // Quotes inside a value, an empty value, and the fields a refused client lacks.
        access = Access {
            kind: "tcp",
            section: "".into(),
            path: Some("/a\"b".into()),
            end: "refused".into(),
            ..Access::default()
        };
        assert_eq!(
            render(&access, "opened", None),
            "access event=opened kind=tcp section=\"\" path=\"/a'b\" up=0 down=0 duration_ms=0"
        );
        assert_eq!(
            render(&access, "closed", Some(Timestamp(0))),
            "{\"time\":\"1970-01-01T00:00:00.000Z\",\"event\":\"closed\",\"kind\":\"tcp\",\
             \"section\":\"\",\"path\":\"/a\\\"b\",\"up\":0,\"down\":0,\"duration_ms\":0,\
             \"end\":\"refused\"}"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_795_333_200_123, "2026-11-22T07:40:00.123Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(Timestamp(ms).to_string(), want, "{ms}");
        }
    }
}
