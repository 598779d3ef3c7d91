//! This process's own TCP sockets, looked up by address, for tests that check the options a
//! proxy running in the test process set on its sockets (tests/tcp.rs, tests/ws.rs). Each is
//! duplicated with `pidfd_getfd(2)` (Linux 5.6), so no raw descriptor is borrowed.

use std::net::SocketAddr;

use rustix::net::{getpeername, getsockname, sockopt, SocketAddrAny};
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

fn inet(a: SocketAddrAny) -> Option<SocketAddr> {
    SocketAddr::try_from(a).ok()
}

/// The congestion control algorithm of each of this process's TCP sockets whose local and
/// peer addresses are `local` and `peer` (either `None`: any), as `TCP_CONGESTION` reads.
pub fn congestion_controls(local: Option<SocketAddr>, peer: Option<SocketAddr>) -> Vec<String> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Some(n) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse().ok())
        else {
            continue;
        };
        // A descriptor closed since the listing, or not a socket, is passed over.
        let Ok(fd) = pidfd_getfd(&me, n, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let (Some(l), Some(p)) = (
            getsockname(&fd).ok().and_then(inet),
            getpeername(&fd).ok().flatten().and_then(inet),
        ) else {
            continue;
        };
        if local.is_none_or(|a| a == l) && peer.is_none_or(|a| a == p) {
            found.extend(sockopt::tcp_congestion(&fd));
        }
    }
    found
}

/// Asserts that the proxy at `proxy` runs `want` on both of its sockets of the tunnel from
/// `client` to `backend`, while the client's own socket runs `default`.
pub fn assert_tunnel_runs(
    proxy: SocketAddr,
    client: SocketAddr,
    backend: SocketAddr,
    want: &str,
    default: &str,
) {
    let to_client = congestion_controls(Some(proxy), Some(client));
    let to_backend = congestion_controls(None, Some(backend));
    let client_own = congestion_controls(Some(client), None);
    assert_eq!(to_client, [want], "the proxy's socket to the client");
    assert_eq!(to_backend, [want], "the proxy's socket to the backend");
    assert_eq!(client_own, [default], "the client's socket");
}

/// The host's default congestion control and another one it has that a test can ask a proxy
/// for; `None` (said on stderr) when the host has only one, and there is nothing to choose.
pub fn default_and_other() -> Option<(String, String)> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap();
    let default = read("tcp_congestion_control").trim().to_string();
    let other = read("tcp_available_congestion_control")
        .split_whitespace()
        .find(|a| *a != default)
        .map(String::from);
    if other.is_none() {
        eprintln!("the host has one congestion control algorithm: nothing to choose");
    }
    Some((default, other?))
}
