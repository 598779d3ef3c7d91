//! The admin endpoint (`[admin] listen`): a minimal HTTP/1.1 server for operators and
//! orchestrators, on its own listener, apart from the proxied traffic.
//!
//! - `GET /metrics`: every metric, in the Prometheus text format ([`crate::metrics`]).
//! - `GET /healthz`: 200 while the process runs (a liveness probe), also while draining.
//! - `GET /readyz`: 200 when every section is listening and has at least one healthy backend;
//!   503 naming what is missing otherwise, and from the moment a shutdown begins, so a load
//!   balancer stops sending new clients while established tunnels drain.
//!
//! `HEAD` works wherever `GET` does; other methods get 405, other paths 404. Each request gets
//! one response and the connection closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;

use crate::net::{self, Net};

/// How long a client has to send its request head: scrapers send it at once.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read; admin requests are a line and a few headers.
const MAX_HEAD: usize = 8 * 1024;

/// How long a response may take to write to a slow scraper.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/readyz` looks at besides the backends.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Every section's listener is bound.
    listening: AtomicBool,
    /// A shutdown has begun: not ready, whatever the backends say.
    draining: AtomicBool,
}

impl State {
    pub(crate) fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Why the process is not ready, if it is not.
    fn not_ready(&self, now: std::time::Instant) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining".into());
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Some("listeners are not bound yet".into());
        }
        crate::metrics::ready(now).err()
    }
}

/// Serves the admin endpoint on `listener` until `stop` completes.
pub(crate) async fn serve<N: Net>(
    net: &N,
    listener: N::Listener,
    state: Arc<State>,
    stop: impl std::future::Future<Output = ()>,
) {
    // Requests under way when it stops get a moment to finish; the process is exiting.
    let drain = Duration::from_millis(500);
    crate::server::accept_loop(net, listener, stop, drain, |stream, peer| {
        answer(net.clone(), stream, peer, state.clone())
    })
    .await;
}

/// Answers one request on `stream`, then closes it.
async fn answer<N: Net>(net: N, mut stream: N::Stream, _peer: SocketAddr, state: Arc<State>) {
    let head = net::timeout(&net, READ_TIMEOUT, async {
        crate::handshake::read_head(&mut stream, MAX_HEAD)
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    })
    .await;
    let response = match head {
        Ok(head) => respond(&head.bytes, &state, net.now()),
        Err(_) => reply(400, "text/plain; charset=utf-8", "bad request\n", false),
    };
    let _ = net::timeout(&net, WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.close().await
    })
    .await;
}

/// The response to the request whose head is `head`.
fn respond(head: &[u8], state: &State, now: std::time::Instant) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let (method, path) = match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => (
            request.method.unwrap_or_default(),
            request.path.unwrap_or_default(),
        ),
        _ => return reply(400, TEXT, "bad request\n", false),
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut r = reply(405, TEXT, "method not allowed\n", false);
        // Insert the Allow header before the blank line ending the head.
        let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 2;
        r.splice(at..at, *b"Allow: GET, HEAD\r\n");
        return r;
    }
    let path = path.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &crate::metrics::render(),
            head_only,
        ),
        "/healthz" => reply(200, TEXT, "ok\n", head_only),
        "/readyz" => match state.not_ready(now) {
            None => reply(200, TEXT, "ready\n", head_only),
            Some(why) => reply(503, TEXT, &format!("not ready: {why}\n"), head_only),
        },
        _ => reply(
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n",
            false,
        ),
    }
}

/// A whole response: status line, headers, and `body` unless `head_only`.
fn reply(status: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(response: &[u8]) -> &str {
        std::str::from_utf8(&response[9..12]).unwrap()
    }

    #[test]
    fn routes_methods_and_readiness() {
        let state = State::default();
        let now = std::time::Instant::now();
        let get = |path: &str, state: &State| {
            respond(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                state,
                now,
            )
        };
        assert_eq!(status_of(&get("/healthz", &state)), "200");
        assert_eq!(status_of(&get("/nope", &state)), "404");
        let r = get("/readyz", &state);
        assert_eq!(status_of(&r), "503");
        assert!(r.ends_with(b"not ready: listeners are not bound yet\n"));
        // Ready once listening depends on the process's backends: see tests/admin.rs.
        state.set_listening();
        state.set_draining();
        let r = get("/readyz", &state);
        assert_eq!(status_of(&r), "503");
        assert!(r.ends_with(b"not ready: draining\n"));
        assert_eq!(status_of(&get("/healthz", &state)), "200");

        let post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", &state, now);
        assert_eq!(status_of(&post), "405");
        let text = String::from_utf8(post).unwrap();
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nmethod not allowed\n"), "{text}");

        let head = respond(b"HEAD /healthz HTTP/1.1\r\n\r\n", &state, now);
        assert!(head.ends_with(
            b"Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(status_of(&respond(b"GARBAGE\r\n\r\n", &state, now)), "400");
    }
}
