//! Prometheus metrics, in the text exposition format 0.0.4, written here rather than pulled in
//! from a metrics crate: a handful of atomics per section and one function that prints them.
//!
//! Every section (a `[[tcp_proxy]]` or `[[ws_proxy]]`, or a builder's proxy, by its name) has
//! one `Section` in a process-wide registry. A reload that keeps a section's name keeps its
//! series, so counters only ever grow. Backend gauges (health, open connections) are read from
//! the live pools when scraped, so they always show the running configuration.
//!
//! What is exported (all series carry `kind` and `section` labels):
//!
//! | metric | type | extra labels |
//! |---|---|---|
//! | `portcullis_connections_accepted_total` | counter | |
//! | `portcullis_connections_active` | gauge | |
//! | `portcullis_connections_refused_total` | counter | `reason` |
//! | `portcullis_connections_closed_total` | counter | `end` |
//! | `portcullis_bytes_total` | counter | `direction` (`to_backend`, `to_client`) |
//! | `portcullis_handshakes_total` | counter | `status` (WebSocket) |
//! | `portcullis_connect_duration_seconds` | histogram | |
//! | `portcullis_handshake_duration_seconds` | histogram | (WebSocket) |
//! | `portcullis_backend_connections_total` | counter | `backend` |
//! | `portcullis_backend_connect_failures_total` | counter | `backend`, `reason` |
//! | `portcullis_backend_active_connections` | gauge | `pool`, `backend` |
//! | `portcullis_backend_up` | gauge | `pool`, `backend` |
//! | `portcullis_tls_handshake_failures_total` | counter | `reason` (TLS listeners) |
//!
//! plus `portcullis_build_info`, and on Linux the usual `process_*` series and
//! `portcullis_thread_waits_total{how="polled"|"slept"}`: how often the proxy's threads ran out
//! of work, and whether busy polling (`busy_poll_us`) or a sleep saw the next work come; and
//! `portcullis_thread_polling_seconds_total`, the time they spent polling.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::balancer::Backend;
use crate::limit::Refused;
use crate::log::Access;

/// Upper bounds of the duration histograms' buckets, in microseconds: 0.5 ms to 10 s, which
/// covers a connect on loopback and one across a continent, and a timeout.
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram: counts per bucket (not cumulative; summed when printed), sum and count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused before it reached a backend, as the `reason` label says it.
const REFUSALS: [&str; 5] = [
    "global_max_connections",
    "max_connections",
    "max_connections_per_ip",
    "out_of_descriptors",
    "proxy_protocol",
];

/// The series that carry labels beyond the section's: few, and touched once per connection.
#[derive(Debug, Default)]
struct Labelled {
    handshakes: BTreeMap<u16, u64>,
    ends: BTreeMap<&'static str, u64>,
    connects: BTreeMap<String, u64>,
    failures: BTreeMap<(String, &'static str), u64>,
    tls_failures: BTreeMap<&'static str, u64>,
}

/// The metrics of one section.
#[derive(Debug)]
pub(crate) struct Section {
    kind: &'static str,
    name: String,
    accepted: AtomicU64,
    active: AtomicI64,
    refused: [AtomicU64; REFUSALS.len()],
    to_backend: AtomicU64,
    to_client: AtomicU64,
    connect: Histogram,
    handshake: Histogram,
    labelled: Mutex<Labelled>,
    /// The running pools, by route path (empty for TCP): set when a flow starts, emptied
    /// when its section is removed.
    pools: Mutex<Vec<(String, Vec<Arc<Backend>>)>>,
}

/// Counts a connection as active until dropped.
#[derive(Debug)]
pub(crate) struct Open(Arc<Section>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `reason` label of a failed connect or upgrade.
pub(crate) fn failure_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        io::ErrorKind::NotFound | io::ErrorKind::InvalidInput => "resolve",
        _ => "error",
    }
}

impl Section {
    /// A connection was accepted: counted, and active until the returned guard drops.
    pub(crate) fn open(self: &Arc<Self>) -> Open {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// A limit refused a connection.
    pub(crate) fn refused(&self, why: Refused) {
        let i = match why {
            Refused::Global => 0,
            Refused::Section => 1,
            Refused::PerIp => 2,
            Refused::Exhausted => 3,
        };
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed because its PROXY header was missing, malformed or untrusted.
    pub(crate) fn refused_proxy_header(&self) {
        self.refused[4].fetch_add(1, Ordering::Relaxed);
    }

    /// A connect to `backend` succeeded after `took`.
    pub(crate) fn connected(&self, backend: &str, took: Duration) {
        self.connect.observe(took);
        // Once per connection: no allocation once the backend has its entry.
        let mut l = self.labelled();
        match l.connects.get_mut(backend) {
            Some(n) => *n += 1,
            None => {
                l.connects.insert(backend.to_string(), 1);
            }
        }
    }

    /// A client's TLS handshake on the listener failed for `reason` (see
    /// [`crate::tls::failure_reason`]).
    pub(crate) fn tls_handshake_failed(&self, reason: &'static str) {
        *self.labelled().tls_failures.entry(reason).or_default() += 1;
    }

    /// A connect to `backend` (or, for WebSocket, its upgrade) failed for `reason`.
    pub(crate) fn connect_failed(&self, backend: &str, reason: &'static str) {
        let mut l = self.labelled();
        *l.failures.entry((backend.to_string(), reason)).or_default() += 1;
    }

    /// The client got `status` for its upgrade request, `took` after it was accepted.
    pub(crate) fn handshake(&self, status: u16, took: Duration) {
        self.handshake.observe(took);
        *self.labelled().handshakes.entry(status).or_default() += 1;
    }

    /// A connection ended as `access` says: its bytes and how it ended.
    pub(crate) fn closed(&self, access: &Access) {
        self.relayed(access.up, access.down);
        self.ended(access);
    }

    /// Bytes moved by a tunnel still open, counted as they go, so that a tunnel open for hours
    /// shows its traffic while it flows rather than all of it when it closes.
    pub(crate) fn relayed(&self, to_backend: u64, to_client: u64) {
        if to_backend > 0 {
            self.to_backend.fetch_add(to_backend, Ordering::Relaxed);
        }
        if to_client > 0 {
            self.to_client.fetch_add(to_client, Ordering::Relaxed);
        }
    }

    /// A connection whose bytes are already counted ([`relayed`](Self::relayed)) ended as
    /// `access` says.
    pub(crate) fn ended(&self, access: &Access) {
        *self
            .labelled()
            .ends
            .entry(end_label(&access.end))
            .or_default() += 1;
    }

    /// The pools new connections use from now on.
    pub(crate) fn set_pools(&self, pools: Vec<(String, Vec<Arc<Backend>>)>) {
        *self.pools.lock().unwrap_or_else(|e| e.into_inner()) = pools;
    }

    /// The section is gone from the configuration: its backends are no longer shown and no
    /// longer count for readiness; its counters stay.
    pub(crate) fn retire(&self) {
        self.set_pools(Vec::new());
    }

    fn labelled(&self) -> std::sync::MutexGuard<'_, Labelled> {
        self.labelled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pools(&self) -> Vec<(String, Vec<Arc<Backend>>)> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The `end` label of an access-log `end`: the same words, without the detail.
fn end_label(end: &str) -> &'static str {
    const CLASSES: [(&str, &str); 11] = [
        ("client closed", "client_closed"),
        ("backend closed", "backend_closed"),
        ("idle timeout", "idle_timeout"),
        ("max connection age", "max_connection_age"),
        ("drain deadline", "drain_deadline"),
        ("refused", "refused"),
        ("backend refused", "backend_refused"),
        ("over a connection limit", "limit"),
        ("no backend", "no_backend"),
        ("every backend", "no_backend"),
        ("health check", "health_check"),
    ];
    if end == "closed" {
        return "closed";
    }
    if let Some((_, label)) = CLASSES.iter().find(|(p, _)| end.starts_with(p)) {
        return label;
    }
    if end.starts_with("client") {
        return "client_error";
    }
    if end.starts_with("backend") {
        return "backend_error";
    }
    "other"
}

/// Every section's metrics, in the order the sections first started.
fn registry() -> &'static Mutex<Vec<Arc<Section>>> {
    static SECTIONS: OnceLock<Mutex<Vec<Arc<Section>>>> = OnceLock::new();
    SECTIONS.get_or_init(Mutex::default)
}

/// The metrics of section `name` of `kind` (`tcp` or `ws`), created on first use.
pub(crate) fn section(kind: &'static str, name: &str) -> Arc<Section> {
    let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = all.iter().find(|s| s.kind == kind && s.name == name) {
        return s.clone();
    }
    let s = Arc::new(Section {
        kind,
        name: name.to_string(),
        accepted: AtomicU64::new(0),
        active: AtomicI64::new(0),
        refused: Default::default(),
        to_backend: AtomicU64::new(0),
        to_client: AtomicU64::new(0),
        connect: Histogram::default(),
        handshake: Histogram::default(),
        labelled: Mutex::default(),
        pools: Mutex::default(),
    });
    all.push(s.clone());
    s
}

fn sections() -> Vec<Arc<Section>> {
    registry().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether every running section has at least one healthy backend at `now`; if not, which
/// sections have none.
pub(crate) fn ready(now: Instant) -> Result<(), String> {
    let down: Vec<String> = sections()
        .iter()
        .filter_map(|s| {
            let pools = s.pools();
            let healthy = pools
                .iter()
                .flat_map(|(_, backends)| backends)
                .any(|b| b.is_healthy(now));
            (!pools.is_empty() && !healthy).then(|| s.name.clone())
        })
        .collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(format!("no healthy backend in: {}", down.join(", ")))
    }
}

/// `s` as a Prometheus label value: backslash, double quote and newline escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the text format: each family's `HELP` and `TYPE` once, then its samples.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text += name;
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        let bounds = BUCKETS_US.iter().map(|&b| seconds(b));
        for (i, le) in bounds.chain(["+Inf".to_string()]).enumerate() {
            let count = || h.count.load(Ordering::Relaxed);
            cumulative = match h.buckets.get(i) {
                Some(n) => cumulative + n.load(Ordering::Relaxed),
                // Read last, and never below the buckets, which a concurrent observe may
                // have counted already.
                None => count().max(cumulative),
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let sum = seconds(h.sum_us.load(Ordering::Relaxed));
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// Microseconds as seconds, exactly, without trailing zeros.
fn seconds(us: u64) -> String {
    let (whole, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Every metric of the process, in the Prometheus text format (version 0.0.4), as
/// `GET /metrics` on the admin endpoint serves it. Embedding applications can serve it
/// themselves.
pub fn render() -> String {
    render_at(Instant::now())
}

/// The series of one section in a family: the labels beyond `kind` and `section`, and the
/// value.
type Series = Vec<(Vec<(&'static str, String)>, u64)>;

/// How a family reads one section's series.
type SeriesOf = fn(&Section) -> Series;

/// How a histogram family finds one section's histogram, if the section has one.
type HistogramOf = fn(&Section) -> Option<&Histogram>;

/// The per-section families: name, type, help, and how to read one section's series.
const FAMILIES: [(&str, &str, &str, SeriesOf); 9] = [
    (
        "portcullis_connections_accepted_total",
        "counter",
        "Connections accepted.",
        |s| vec![(vec![], s.accepted.load(Ordering::Relaxed))],
    ),
    (
        "portcullis_connections_active",
        "gauge",
        "Connections open now.",
        |s| vec![(vec![], s.active.load(Ordering::Relaxed).max(0) as u64)],
    ),
    (
        "portcullis_connections_refused_total",
        "counter",
        "Connections refused before reaching a backend: over a limit, out of descriptors, or a bad PROXY header.",
        |s| {
            let count = |(i, reason): (usize, &&str)| {
                (vec![("reason", reason.to_string())], s.refused[i].load(Ordering::Relaxed))
            };
            REFUSALS.iter().enumerate().map(count).collect()
        },
    ),
    (
        "portcullis_connections_closed_total",
        "counter",
        "Connections ended, by how they ended (as the access log's `end`).",
        |s| {
            let ends = s.labelled().ends.clone();
            ends.into_iter().map(|(end, v)| (vec![("end", end.to_string())], v)).collect()
        },
    ),
    (
        "portcullis_bytes_total",
        "counter",
        "Bytes relayed each way, counted as they are relayed.",
        |s| {
            let each = [("to_backend", &s.to_backend), ("to_client", &s.to_client)];
            let count = |(direction, n): (&str, &AtomicU64)| {
                (vec![("direction", direction.to_string())], n.load(Ordering::Relaxed))
            };
            each.into_iter().map(count).collect()
        },
    ),
    (
        "portcullis_handshakes_total",
        "counter",
        "WebSocket upgrade requests answered, by the status the client got.",
        |s| {
            let statuses = s.labelled().handshakes.clone();
            let count = |(status, v): (u16, u64)| (vec![("status", status.to_string())], v);
            statuses.into_iter().map(count).collect()
        },
    ),
    (
        "portcullis_backend_connections_total",
        "counter",
        "Connects to a backend that succeeded.",
        |s| {
            let connects = s.labelled().connects.clone();
            connects.into_iter().map(|(b, v)| (vec![("backend", b)], v)).collect()
        },
    ),
    (
        "portcullis_backend_connect_failures_total",
        "counter",
        "Connects to a backend (or WebSocket upgrades) that failed, by reason.",
        |s| {
            let failures = s.labelled().failures.clone();
            let count = |((backend, reason), v): ((String, &'static str), u64)| {
                (vec![("backend", backend), ("reason", reason.to_string())], v)
            };
            failures.into_iter().map(count).collect()
        },
    ),
    (
        "portcullis_tls_handshake_failures_total",
        "counter",
        "Clients whose TLS handshake on the listener failed, by reason.",
        |s| {
            let failures = s.labelled().tls_failures.clone();
            let count = |(reason, v): (&str, u64)| (vec![("reason", reason.to_string())], v);
            failures.into_iter().map(count).collect()
        },
    ),
];

/// How a per-backend gauge reads its value at a time.
type BackendValue = fn(&Backend, Instant) -> usize;

fn render_at(now: Instant) -> String {
    let all = sections();
    let mut out = Out {
        text: String::with_capacity(4096),
    };
    fn section_labels(s: &Section) -> [(&'static str, &str); 2] {
        [("kind", s.kind), ("section", s.name.as_str())]
    }

    out.family(
        "portcullis_build_info",
        "gauge",
        "The running version; always 1.",
    );
    out.sample(
        "portcullis_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    for (name, kind, help, series) in FAMILIES {
        out.family(name, kind, help);
        for s in &all {
            for (extra, value) in series(s) {
                let mut labels = section_labels(s).to_vec();
                labels.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
                out.sample(name, &labels, value);
            }
        }
    }

    let histograms: [(&str, &str, HistogramOf); 2] = [
        (
            "portcullis_connect_duration_seconds",
            "Time to connect to a backend, for connects that succeeded.",
            |s| Some(&s.connect),
        ),
        (
            "portcullis_handshake_duration_seconds",
            "Time from accepting a WebSocket client to answering its upgrade request.",
            |s| (s.kind == "ws").then_some(&s.handshake),
        ),
    ];
    for (name, help, histogram) in histograms {
        out.family(name, "histogram", help);
        for s in &all {
            if let Some(h) = histogram(s) {
                out.histogram(name, &section_labels(s), h);
            }
        }
    }

    let gauges: [(&str, &str, BackendValue); 2] = [
        (
            "portcullis_backend_active_connections",
            "Connections open to a backend now.",
            |b, _| b.active_connections(),
        ),
        (
            "portcullis_backend_up",
            "1 while a backend takes new connections (passive and active health agree), else 0.",
            |b, now| usize::from(b.is_healthy(now)),
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        for s in &all {
            for (pool, backends) in s.pools() {
                for b in backends {
                    let [k, n] = section_labels(s);
                    let backend = b.to_string();
                    let labels = [k, n, ("pool", pool.as_str()), ("backend", &backend)];
                    out.sample(name, &labels, value(&b, now));
                }
            }
        }
    }

    #[cfg(target_os = "linux")]
    {
        let name = "portcullis_thread_waits_total";
        out.family(
            name,
            "counter",
            "Times the proxy's threads ran out of work, by how the next work found them: \
             how=\"polled\" while they polled (busy_poll_us), how=\"slept\" asleep.",
        );
        let (polled, slept) = crate::reactor::waits();
        out.sample(name, &[("how", "polled")], polled);
        out.sample(name, &[("how", "slept")], slept);
        let name = "portcullis_thread_polling_seconds_total";
        out.family(
            name,
            "counter",
            "Time the proxy's threads spent polling for work (busy_poll_us), by the clock. \
             On a core of their own, CPU time that waited for work rather than did it; on a \
             shared core they yield between polls, so part of it went to other processes.",
        );
        out.sample(name, &[], crate::reactor::polling_time().as_secs_f64());
    }

    process(&mut out);
    out.text
}

/// The standard `process_*` series, from `/proc/self` (Linux only; elsewhere none).
fn process(out: &mut Out) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(fields) = stat.rsplit_once(')').map(|(_, rest)| {
        rest.split_ascii_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    }) else {
        return;
    };
    // Linux's USER_HZ is 100 on every architecture it exports to user space.
    const TICKS: f64 = 100.0;
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    let cpu = (field(14) + field(15)) as f64 / TICKS;
    out.family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
    );
    out.sample("process_cpu_seconds_total", &[], cpu);
    let page = 4096;
    out.family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    out.sample("process_resident_memory_bytes", &[], field(24) * page);
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        out.sample("process_open_fds", &[], fds.count());
    }
    if let Some(start) = start_time() {
        out.family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
        );
        out.sample("process_start_time_seconds", &[], start);
    }
}

/// When the metrics were first touched, which is at start-up: close enough to the process's
/// start for a restart counter, without parsing boot time.
fn start_time() -> Option<u64> {
    static START: OnceLock<u64> = OnceLock::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(*START.get_or_init(|| now.as_secs()))
}

/// Notes the process's start time now, for `process_start_time_seconds`.
pub(crate) fn started() {
    let _ = start_time();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_and_short() {
        assert_eq!(seconds(500), "0.0005");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(1_234_567), "1.234567");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn ends_are_classed() {
        let cases = [
            ("client closed", "client_closed"),
            ("backend closed", "backend_closed"),
            ("closed", "closed"),
            ("idle timeout", "idle_timeout"),
            ("drain deadline", "drain_deadline"),
            ("refused: 400 Bad Request", "refused"),
            ("backend refused with 403", "backend_refused"),
            ("client error: ConnectionReset", "client_error"),
            ("backend error: BrokenPipe", "backend_error"),
            ("every backend tried failed", "no_backend"),
        ];
        for (end, want) in cases {
            assert_eq!(end_label(end), want, "{end}");
        }
    }

    #[test]
    fn histograms_print_cumulative_buckets_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = Out {
            text: String::new(),
        };
        out.histogram("t", &[("section", "s")], &h);
        let lines: Vec<&str> = out.text.lines().collect();
        assert_eq!(lines[0], "t_bucket{section=\"s\",le=\"0.0005\"} 1");
        assert_eq!(lines[3], "t_bucket{section=\"s\",le=\"0.005\"} 2");
        assert_eq!(lines[13], "t_bucket{section=\"s\",le=\"10\"} 2");
        assert_eq!(lines[14], "t_bucket{section=\"s\",le=\"+Inf\"} 3");
        assert_eq!(lines[15], "t_sum{section=\"s\"} 20.0033");
        assert_eq!(lines[16], "t_count{section=\"s\"} 3");
    }
}
