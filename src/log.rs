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

#[cfg(test)]
mod tests {
    use super::*;

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
