//! Log lines on standard error: one line per event, `key=value` fields after a UTC timestamp,
//! so they read well in a terminal and split cleanly with `grep` and `awk`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one log line: the timestamp, the level, then `args`.
pub(crate) fn line(level: &str, args: fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // One write per line, so lines from different threads never interleave; eprint! rather than
    // a raw stderr handle, so the test harness captures the lines of passing tests.
    let text = format!("{} {level} {args}\n", Timestamp(now.as_millis() as u64));
    eprint!("{text}");
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

/// Sets the process-wide access-log options.
pub(crate) fn configure(json: bool, log_open: bool) {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    LOG_OPEN.store(log_open, std::sync::atomic::Ordering::Relaxed);
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
        let mut fields: Vec<(&str, String, bool)> = vec![
            ("event", event.to_string(), true),
            ("kind", self.kind.to_string(), true),
            ("section", self.section.to_string(), true),
        ];
        let mut opt = |name, value: Option<String>, quoted| {
            if let Some(v) = value {
                fields.push((name, v, quoted));
            }
        };
        opt("route", self.route.clone(), true);
        opt("client", self.client.map(|c| c.to_string()), true);
        opt("backend", self.backend.clone(), true);
        opt("path", self.path.clone(), true);
        opt("status", self.status.map(|s| s.to_string()), false);
        opt("tls", self.tls.map(str::to_string), true);
        fields.push(("up", self.up.to_string(), false));
        fields.push(("down", self.down.to_string(), false));
        if let Some(c) = self.connect_ms {
            fields.push(("connect_ms", c.to_string(), false));
        }
        fields.push(("duration_ms", self.duration_ms.to_string(), false));
        if event == "closed" {
            fields.push(("end", self.end.clone(), true));
        }
        if JSON.load(std::sync::atomic::Ordering::Relaxed) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let mut out = format!("{{\"time\":\"{}\"", Timestamp(now.as_millis() as u64));
            for (name, value, quoted) in &fields {
                if *quoted {
                    out += &format!(",\"{name}\":\"{}\"", json_escape(value));
                } else {
                    out += &format!(",\"{name}\":{value}");
                }
            }
            out += "}\n";
            eprint!("{out}");
        } else {
            let mut out = String::from("access");
            for (name, value, _) in &fields {
                if value.contains([' ', '"']) || value.is_empty() {
                    out += &format!(" {name}=\"{}\"", value.replace('"', "'"));
                } else {
                    out += &format!(" {name}={value}");
                }
            }
            line("INFO", format_args!("{out}"));
        }
    }
}

/// `s` with JSON's string escapes.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            '\r' => out += "\\r",
            '\t' => out += "\\t",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_escape("a\"b\\c\nd\u{1}"), "a\\\"b\\\\c\\nd\\u0001");
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
