//! WebSocket routing: which route a request belongs to, and the path its backend sees.
//!
//! Routes match a path prefix on a segment boundary (`/ws/chat` matches `/ws/chat`,
//! `/ws/chat/room1` and `/ws/chat?x=1`, never `/ws/chatty`) and optionally a Host. As in nginx,
//! where the server name is chosen before the location, routes naming the request's host are
//! considered first; only if none of them matches the path do host-less routes get their turn.
//! Among the candidates the longest prefix wins.

use crate::config::WsRoute;

/// Finds the route for a request with Host `host` (as sent, port included or not) and request
/// target `target` (path and query).
pub(crate) fn find<'a, T>(
    routes: &'a [T],
    host: Option<&str>,
    target: &str,
    key: impl Fn(&T) -> &WsRoute,
) -> Option<&'a T> {
    let host = host.map(host_name);
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let best = |named: bool| {
        routes
            .iter()
            .filter(|r| match &key(r).host {
                Some(h) => named && host.as_deref() == Some(h.as_str()),
                None => !named,
            })
            .filter(|r| prefix_matches(&key(r).path, path))
            .max_by_key(|r| key(r).path.len())
    };
    best(true).or_else(|| best(false))
}

/// The lower-cased host of a Host header value, without its port.
pub(crate) fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        // [v6]:port: keep the brackets, as route hosts are written.
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.to_ascii_lowercase()
}

/// Whether `prefix` matches `path` on a segment boundary.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// The request target the backend sees: the route's matched prefix replaced by its `rewrite`,
/// then the backend's own path prefix (from `ws://host:port/prefix`) put in front.
pub(crate) fn backend_target(route: &WsRoute, backend_prefix: &str, target: &str) -> String {
    let rewritten = match &route.rewrite {
        None => target.to_string(),
        Some(to) => {
            let rest = target.strip_prefix(route.path.as_str()).unwrap_or(target);
            join(to, rest)
        }
    };
    if backend_prefix.is_empty() {
        rewritten
    } else {
        join(backend_prefix, &rewritten)
    }
}

/// `a` followed by `b` with exactly one `/` between them where both bring one, and `/` where the
/// result would otherwise be empty.
fn join(a: &str, b: &str) -> String {
    let joined = match (a.ends_with('/'), b.starts_with('/')) {
        (true, true) => format!("{a}{}", &b[1..]),
        (false, false) if !b.is_empty() && !b.starts_with('?') => format!("{a}/{b}"),
        _ => format!("{a}{b}"),
    };
    if joined.is_empty() || joined.starts_with('?') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: &str, rewrite: Option<&str>) -> WsRoute {
        WsRoute {
            host: host.map(str::to_string),
            path: path.to_string(),
            rewrite: rewrite.map(str::to_string),
            ..WsRoute::catch_all([format!("{}{path}:1", host.unwrap_or("any"))])
        }
    }

    #[test]
    fn longest_prefix_on_a_segment_boundary_wins_and_named_hosts_come_first() {
        let routes = [
            route(None, "/ws", None),
            route(None, "/ws/chat", None),
            route(Some("feed.example.com"), "/", None),
            route(Some("feed.example.com"), "/ws/live", None),
        ];
        let cases: &[(Option<&str>, &str, Option<usize>)] = &[
            (None, "/ws/chat", Some(1)),
            (None, "/ws/chat/room1?x=1", Some(1)),
            (None, "/ws/chat?x=1", Some(1)),
            (None, "/ws/chatty", Some(0)),
            (None, "/ws", Some(0)),
            (None, "/wsx", None),
            (None, "/", None),
            (Some("other.example.com"), "/ws/chat", Some(1)),
            (Some("FEED.example.com:8080"), "/ws/chat", Some(2)),
            (Some("feed.example.com"), "/ws/live/1", Some(3)),
            (Some("feed.example.com"), "/anything", Some(2)),
        ];
        for &(host, target, want) in cases {
            let got = find(&routes, host, target, |r| r)
                .map(|r| routes.iter().position(|x| x == r).unwrap());
            assert_eq!(got, want, "{host:?} {target}");
        }
        let catch_all = [route(None, "/", None)];
        assert!(find(&catch_all, None, "/anything/at/all?q", |r| r).is_some());
    }

    #[test]
    fn host_names_lose_port_and_case() {
        for (raw, want) in [
            ("Chat.Example.com:443", "chat.example.com"),
            ("a", "a"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(host_name(raw), want);
        }
    }

    #[test]
    fn targets_are_rewritten_then_prefixed() {
        let cases: &[(&str, Option<&str>, &str, &str, &str)] = &[
            (
                "/ws/chat",
                Some("/chat"),
                "",
                "/ws/chat/room1?x=1",
                "/chat/room1?x=1",
            ),
            ("/ws/chat", Some("/chat"), "", "/ws/chat", "/chat"),
            ("/ws/chat", Some("/chat"), "", "/ws/chat?x=1", "/chat?x=1"),
            ("/ws/chat", Some("/"), "", "/ws/chat/room1", "/room1"),
            ("/ws/chat", Some("/"), "", "/ws/chat", "/"),
            ("/ws/chat", Some("/"), "", "/ws/chat?x", "/?x"),
            ("/ws/", Some("/v2/"), "", "/ws/a", "/v2/a"),
            ("/ws/chat", None, "", "/ws/chat/room1", "/ws/chat/room1"),
            ("/", None, "/api", "/socket?t=1", "/api/socket?t=1"),
            ("/", None, "/api", "/", "/api/"),
            ("/ws/chat", Some("/chat"), "/v1", "/ws/chat/r", "/v1/chat/r"),
        ];
        for &(path, rewrite, prefix, target, want) in cases {
            let r = route(None, path, rewrite);
            assert_eq!(
                backend_target(&r, prefix, target),
                want,
                "{path} {rewrite:?} {prefix} {target}"
            );
        }
    }
}
