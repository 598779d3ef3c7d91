//! Backend health: passive (what real connections tell) and active (what probes tell).
//!
//! Passive health counts consecutive connect failures; at `max_fails` the backend is ejected for
//! `fail_timeout`, doubling on each ejection in a row up to a cap. When the ejection ends, one
//! trial connection decides: success brings the backend back, failure ejects it again for
//! longer. Only backend-side failures are recorded, never a client that went away.
//!
//! Active health counts consecutive probe results against thresholds. Both report only flips
//! (up → down, down → up), so a dead backend logs one line, not one per failed connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that eject a backend when none is configured (as nginx's `max_fails`
/// default is 1, too trigger-happy for long-lived connections; HAProxy's `fall` is 3).
pub const DEFAULT_MAX_FAILS: u32 = 3;

/// How long an ejection lasts when none is configured, before doubling (nginx: 10 s).
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 10_000;

/// How many times the first ejection an ejection may last at most: 10 s doubling stops at
/// 160 s, so a backend that recovers is back within a few minutes at worst.
const EJECTION_CAP_FACTOR: u32 = 16;

/// A change of a backend's health, to be logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// The backend stopped taking new connections, for the given time (passive) or until its
    /// checks pass (active: zero).
    Down(Duration),
    /// The backend takes new connections again.
    Up,
}

/// What passive health allows right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Take connections.
    Healthy,
    /// Ejected, and the ejection is over: one trial connection may go (claim it with
    /// [`Passive::claim_trial`]).
    TrialDue,
    /// Ejected, or a trial is under way.
    Ejected,
}

/// Passive health settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive failures that eject the backend.
    pub max_fails: u32,
    /// How long the first ejection lasts.
    pub fail_timeout: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: Duration::from_millis(DEFAULT_FAIL_TIMEOUT_MS),
        }
    }
}

/// The passive health of one backend.
#[derive(Debug)]
pub struct Passive {
    config: PassiveConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Consecutive failures since the last success.
    fails: u32,
    /// Set while ejected: when the ejection ends.
    until: Option<Instant>,
    /// Ejections in a row without a success between them; the next one lasts
    /// `fail_timeout × 2^ejections`.
    ejections: u32,
    /// A trial connection is under way.
    trial: bool,
}

impl Passive {
    /// A healthy backend.
    pub fn new(config: PassiveConfig) -> Self {
        Passive {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way that
        // matters more than losing health tracking, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the backend may take a connection at `now`.
    pub fn availability(&self, now: Instant) -> Availability {
        let s = self.state();
        match s.until {
            None => Availability::Healthy,
            Some(_) if s.trial => Availability::Ejected,
            Some(until) if now >= until => Availability::TrialDue,
            Some(_) => Availability::Ejected,
        }
    }

    /// Claims the one trial connection of an ended ejection; false when it is not due or
    /// another connection claimed it first.
    pub fn claim_trial(&self, now: Instant) -> bool {
        let mut s = self.state();
        match s.until {
            Some(until) if now >= until && !s.trial => {
                s.trial = true;
                true
            }
            _ => false,
        }
    }

    /// Records a connection that worked.
    pub fn success(&self) -> Option<Flip> {
        let mut s = self.state();
        let was_ejected = s.until.is_some();
        *s = State::default();
        was_ejected.then_some(Flip::Up)
    }

    /// Records a connect failure or timeout at `now`; `trial` says whether it was the trial
    /// connection (a failure of a connection that started before the ejection must not be
    /// taken for the trial's verdict).
    pub fn failure(&self, now: Instant, trial: bool) -> Option<Flip> {
        let mut s = self.state();
        if s.until.is_some() && !(trial && s.trial) {
            // Already ejected, and this is not the trial: nothing new to learn.
            return None;
        }
        s.fails = s.fails.saturating_add(1);
        if !trial && s.fails < self.config.max_fails {
            return None;
        }
        let factor = 1u32
            .checked_shl(s.ejections)
            .unwrap_or(u32::MAX)
            .min(EJECTION_CAP_FACTOR);
        let lasts = self.config.fail_timeout * factor;
        s.until = Some(now + lasts);
        s.ejections = s.ejections.saturating_add(1);
        s.trial = false;
        Some(Flip::Down(lasts))
    }

    /// Gives back a claimed trial that ended without telling anything about the backend (the
    /// client went away first), so the next connection can try.
    pub fn release_trial(&self) {
        self.state().trial = false;
    }
}

/// Active health settings, as rws names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveConfig {
    /// What a probe does.
    pub kind: CheckKind,
    /// The path an `http` or `websocket` probe requests.
    pub path: String,
    /// Time between probes of one backend.
    pub interval: Duration,
    /// How long one probe may take.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub healthy_threshold: u32,
    /// Consecutive failures that take an up backend down.
    pub unhealthy_threshold: u32,
}

/// What an active probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET of the path, expecting a 2xx.
    Http,
    /// A WebSocket upgrade of the path, expecting a valid 101.
    WebSocket,
}

/// The active health of one backend: up until probes say otherwise.
#[derive(Debug)]
pub struct Active {
    up: AtomicBool,
    /// Consecutive results against the current state.
    streak: Mutex<u32>,
}

impl Default for Active {
    fn default() -> Self {
        Active {
            up: AtomicBool::new(true),
            streak: Mutex::new(0),
        }
    }
}

impl Active {
    /// Whether probes allow new connections.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records one probe result.
    pub fn record(&self, ok: bool, config: &ActiveConfig) -> Option<Flip> {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        let up = self.is_up();
        if ok == up {
            *streak = 0;
            return None;
        }
        *streak += 1;
        let threshold = if up {
            config.unhealthy_threshold
        } else {
            config.healthy_threshold
        };
        if *streak < threshold.max(1) {
            return None;
        }
        *streak = 0;
        self.up.store(ok, Ordering::Relaxed);
        Some(if ok {
            Flip::Up
        } else {
            Flip::Down(Duration::ZERO)
        })
    }
}

/// Runs the active checks of `backends` until `stop` completes: one task per backend, probing
/// every `interval` on `net`'s clock (so simulated under turmoil), flipping the backend's
/// [`Active`] state at the thresholds and logging each flip once.
pub(crate) fn spawn_checks<N: crate::net::Net>(
    net: &N,
    pool: &str,
    backends: &[std::sync::Arc<crate::balancer::Backend>],
    config: &ActiveConfig,
    stop: &async_channel::Receiver<()>,
    tls: Option<std::sync::Arc<crate::tls::Connector>>,
    proxy_protocol: Option<crate::proxy_protocol::Version>,
) {
    for backend in backends {
        let (net2, backend, config, stop) =
            (net.clone(), backend.clone(), config.clone(), stop.clone());
        let pool = pool.to_string();
        let tls = tls.clone();
        let header = proxy_protocol.map(crate::proxy_protocol::encode_local);
        net.spawn(async move {
            let run = async {
                loop {
                    let ok =
                        probe(&net2, &backend, &config, tls.as_deref(), header.as_deref()).await;
                    match backend.checks().record(ok.is_ok(), &config) {
                        Some(Flip::Down(_)) => crate::log::warn!(
                            "backend down pool={pool} backend={backend} check={:?} ({})",
                            config.kind,
                            ok.err().unwrap_or_default()
                        ),
                        Some(Flip::Up) => crate::log::warn!(
                            "backend up pool={pool} backend={backend} check={:?}",
                            config.kind
                        ),
                        None => {}
                    }
                    net2.sleep(config.interval).await;
                }
            };
            futures_lite::future::or(run, async {
                let _ = stop.recv().await;
            })
            .await;
        });
    }
}

/// One probe of `addr`: `Err` says why it failed. A TLS backend (`wss://`, or every backend
/// of a section with `upstream_tls`) is probed over TLS with `tls`, so a `tcp` check includes
/// the handshake. `proxy_header` (when the section sends PROXY headers, the backend may require
/// one on every connection) goes first, on the raw connection, as real connections send theirs.
async fn probe<N: crate::net::Net>(
    net: &N,
    backend: &crate::balancer::Backend,
    config: &ActiveConfig,
    tls: Option<&crate::tls::Connector>,
    proxy_header: Option<&[u8]>,
) -> Result<(), String> {
    let addr = backend.addr();
    use futures_lite::AsyncWriteExt;
    let work = async {
        let mut stream = backend.connect(net).await?;
        if let Some(header) = proxy_header {
            stream.write_all(header).await?;
        }
        let mut stream = match (tls, backend.is_tls()) {
            (Some(c), true) => c.connect(backend.host(), stream).await?,
            _ => crate::tls::Stream::Plain(stream),
        };
        let request = match config.kind {
            CheckKind::Tcp => return Ok(Ok(())),
            CheckKind::Http => format!(
                "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-health\r\nConnection: close\r\n\r\n",
                config.path
            ),
            CheckKind::WebSocket => format!(
                "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-health\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {PROBE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                config.path
            ),
        };
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let head = match crate::handshake::read_head(&mut stream, 16 * 1024).await {
            Ok(head) => head,
            Err(e) => return Ok(Err(format!("no response: {e}"))),
        };
        let _ = stream.close().await;
        Ok(judge(&head.bytes, config.kind))
    };
    match crate::net::timeout(net, config.timeout, work).await {
        Ok(verdict) => verdict,
        Err(e) => Err(e.to_string()),
    }
}

/// The key of a WebSocket probe. Fixed: a probe proves the backend completes the handshake, not
/// that keys are random.
const PROBE_KEY: &str = "cG9ydGN1bGxpcy1wcm9iZQ==";

/// Whether a probe's response head is a pass.
fn judge(head: &[u8], kind: CheckKind) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let status = match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => response.code.unwrap_or(0),
        _ => return Err("malformed response".into()),
    };
    match kind {
        CheckKind::Http if (200..300).contains(&status) => Ok(()),
        CheckKind::WebSocket if status == 101 => {
            let accept = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|h| h.value);
            if accept == Some(crate::handshake::accept_key(PROBE_KEY).as_bytes()) {
                Ok(())
            } else {
                Err("101 with a wrong Sec-WebSocket-Accept".into())
            }
        }
        _ => Err(format!("status {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ejects_after_max_fails_then_one_trial_decides_and_ejections_double() {
        let t0 = Instant::now();
        let p = Passive::new(PassiveConfig {
            max_fails: 3,
            fail_timeout: 100 * MS,
        });
        assert_eq!(p.failure(t0, false), None);
        assert_eq!(p.failure(t0, false), None);
        assert_eq!(p.availability(t0), Availability::Healthy);
        assert_eq!(p.failure(t0, false), Some(Flip::Down(100 * MS)));
        assert_eq!(p.availability(t0 + 99 * MS), Availability::Ejected);
        assert_eq!(p.availability(t0 + 100 * MS), Availability::TrialDue);
        assert!(p.claim_trial(t0 + 100 * MS));
        assert!(!p.claim_trial(t0 + 100 * MS), "only one trial");
        assert_eq!(p.availability(t0 + 100 * MS), Availability::Ejected);
        // The trial fails: ejected again, for twice as long.
        assert_eq!(p.failure(t0 + 100 * MS, true), Some(Flip::Down(200 * MS)));
        assert_eq!(p.availability(t0 + 299 * MS), Availability::Ejected);
        assert!(p.claim_trial(t0 + 300 * MS));
        assert_eq!(p.success(), Some(Flip::Up));
        assert_eq!(p.availability(t0 + 300 * MS), Availability::Healthy);
        // Recovered: the next ejection starts from the base time again.
        for _ in 0..2 {
            assert_eq!(p.failure(t0, false), None);
        }
        assert_eq!(p.failure(t0 + 400 * MS, false), Some(Flip::Down(100 * MS)));
    }

    #[test]
    fn a_success_resets_the_count_and_ejections_are_capped() {
        let t0 = Instant::now();
        let p = Passive::new(PassiveConfig {
            max_fails: 2,
            fail_timeout: 10 * MS,
        });
        assert_eq!(p.failure(t0, false), None);
        assert_eq!(p.success(), None);
        assert_eq!(p.failure(t0, false), None);
        let mut now = t0;
        let mut lasted = Vec::new();
        assert!(matches!(p.failure(now, false), Some(Flip::Down(_))));
        for _ in 0..8 {
            now += Duration::from_secs(10);
            assert!(p.claim_trial(now));
            match p.failure(now, true) {
                Some(Flip::Down(d)) => lasted.push(d.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(lasted, [20, 40, 80, 160, 160, 160, 160, 160]);
    }

    #[test]
    fn failures_of_connections_started_before_an_ejection_change_nothing() {
        let t0 = Instant::now();
        let p = Passive::new(PassiveConfig {
            max_fails: 1,
            fail_timeout: 100 * MS,
        });
        assert_eq!(p.failure(t0, false), Some(Flip::Down(100 * MS)));
        assert_eq!(p.failure(t0 + MS, false), None);
        assert_eq!(p.availability(t0 + 100 * MS), Availability::TrialDue);
    }

    #[test]
    fn only_the_trial_decides_while_it_is_under_way() {
        let t0 = Instant::now();
        let p = Passive::new(PassiveConfig {
            max_fails: 1,
            fail_timeout: 100 * MS,
        });
        p.failure(t0, false);
        assert!(p.claim_trial(t0 + 100 * MS));
        // A connection from before the ejection times out now: not the trial's verdict.
        assert_eq!(p.failure(t0 + 150 * MS, false), None);
        assert_eq!(p.success(), Some(Flip::Up));
    }

    #[test]
    fn a_released_trial_can_be_claimed_again() {
        let t0 = Instant::now();
        let p = Passive::new(PassiveConfig {
            max_fails: 1,
            fail_timeout: MS,
        });
        p.failure(t0, false);
        assert!(p.claim_trial(t0 + MS));
        p.release_trial();
        assert!(p.claim_trial(t0 + MS));
    }

    #[test]
    fn probe_responses_are_judged_by_kind() {
        let ok101 = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            crate::handshake::accept_key(PROBE_KEY)
        );
        let cases: &[(&str, CheckKind, bool)] = &[
            ("HTTP/1.1 200 OK\r\n\r\n", CheckKind::Http, true),
            ("HTTP/1.1 204 No Content\r\n\r\n", CheckKind::Http, true),
            ("HTTP/1.1 301 Moved\r\n\r\n", CheckKind::Http, false),
            ("HTTP/1.1 503 Unavailable\r\n\r\n", CheckKind::Http, false),
            ("garbage\r\n\r\n", CheckKind::Http, false),
            (&ok101, CheckKind::WebSocket, true),
            (
                "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n",
                CheckKind::WebSocket,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", CheckKind::WebSocket, false),
        ];
        for &(head, kind, pass) in cases {
            assert_eq!(
                judge(head.as_bytes(), kind).is_ok(),
                pass,
                "{kind:?} {head:?}"
            );
        }
    }

    #[test]
    fn active_checks_flip_only_at_their_thresholds() {
        let config = ActiveConfig {
            kind: CheckKind::Tcp,
            path: "/health".into(),
            interval: 10 * MS,
            timeout: 10 * MS,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let a = Active::default();
        let results = [
            false, false, true, false, false, false, true, true, false, true, true,
        ];
        let flips: Vec<_> = results.iter().map(|&ok| a.record(ok, &config)).collect();
        use Flip::*;
        let want = [
            None,
            None,
            None,
            None,
            None,
            Some(Down(Duration::ZERO)),
            None,
            Some(Up),
            None,
            None,
            None,
        ];
        assert_eq!(flips, want);
        assert!(a.is_up());
    }
}
