//! The `portcullis` binary as a user runs it: exit codes, messages, and proxies started from
//! flags and from a config file carrying traffic on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn portcullis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

/// Runs the binary to completion and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = portcullis().args(args).output().expect("run portcullis");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (
        out.status.code().unwrap_or(-1),
        text(out.stdout),
        text(out.stderr),
    )
}

/// A running proxy process, killed when dropped.
struct Running {
    child: Child,
    /// Later `listening` lines (after a reload).
    lines: mpsc::Receiver<(String, String)>,
    /// Every line it wrote to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The name and address of each `listening` line, in the order they were printed
    /// (sections start concurrently, so that order is not the file's).
    addrs: Vec<(String, SocketAddr)>,
}

impl Running {
    /// Waits for a later `listening` line of the section called `name` and records it.
    fn wait_listening(&mut self, name: &str) -> SocketAddr {
        loop {
            let (n, addr) = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("a listening line");
            let addr: SocketAddr = addr.parse().expect("a socket address");
            self.addrs.push((n.clone(), addr));
            if n == name {
                return addr;
            }
        }
    }

    /// Waits up to 5 s for the `nth` (from 1) line of the log that contains `needle`.
    fn wait_log(&self, needle: &str, nth: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.iter().filter(|l| l.contains(needle)).nth(nth - 1) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line {nth} with {needle:?}: {log:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address of the `nth` admin endpoint the process has listened on.
    fn admin(&self, nth: usize) -> SocketAddr {
        let line = self.wait_log("admin listening addr=", nth);
        let addr = line.split("addr=").nth(1).unwrap();
        addr.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The address the section called `name` listens on.
    fn addr(&self, name: &str) -> SocketAddr {
        let found = self.addrs.iter().find(|(n, _)| n == name);
        found
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.addrs))
            .1
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and waits for `listeners` "listening" lines on stderr (port 0 is resolved
/// to the real address there).
fn start(args: &[&str], listeners: usize) -> Running {
    let mut child = portcullis()
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portcullis");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log2.lock().unwrap().push(line.clone());
            let field = |key: &str| {
                let value = line.split(&format!(" {key}=")).nth(1)?;
                Some(value.split_whitespace().next().unwrap_or("").to_string())
            };
            if line.contains(" listening ") {
                let (Some(name), Some(addr)) = (field("name"), field("addr")) else {
                    continue;
                };
                if tx.send((name, addr)).is_err() {
                    break;
                }
            }
        }
    });
    let mut running = Running {
        child,
        lines: rx,
        log,
        addrs: Vec::new(),
    };
    for _ in 0..listeners {
        let (name, addr) = running
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a listening line");
        running
            .addrs
            .push((name, addr.parse().expect("a socket address")));
    }
    running
}

/// An echo server on a free loopback port, on its own thread.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn echo_through(addr: SocketAddr, message: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(message).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got
}

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn version_and_help_exit_zero() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("portcullis ", env!("CARGO_PKG_VERSION")))
    );
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for word in ["check", "tcp", "ws", "demo", "--config"] {
        assert!(out.contains(word), "help does not mention {word}: {out}");
    }
}

#[test]
fn usage_errors_exit_two() {
    for args in [
        &["--bogus"][..],
        &[],
        &["tcp", "--listen", "127.0.0.1:0"],
        &["tcp", "--backend", "a:1"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?} printed no message");
    }
    let (code, _, err) = run(&["tcp", "--listen", "127.0.0.1:0", "--backend", "nope"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--backend: \"nope\" is not a backend address"),
        "{err}"
    );
}

#[test]
fn check_prints_what_would_run_and_rejects_with_the_place() {
    let valid = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/config/valid/rws_sections.toml"
    );
    let (code, out, err) = run(&["check", "--config", valid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 2 listener(s)"), "{out}");
    assert!(
        out.contains("tcp_proxy \"postgres\": listen 0.0.0.0:5432 -> db-1:5432, db-2:5432"),
        "{out}"
    );
    assert!(
        out.contains("ws_proxy \"chat\": listen 0.0.0.0:8080"),
        "{out}"
    );

    let invalid = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/config/invalid/empty_backends.toml"
    );
    let (code, out, err) = run(&["check", "--config", invalid]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with(&format!(
            "error: {invalid}:4:12: [[tcp_proxy]] #1, field `backends`"
        )),
        "{err}"
    );
}

#[test]
fn an_address_in_use_exits_one_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(&["tcp", "--listen", &addr, "--backend", "127.0.0.1:9"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn a_one_off_tcp_proxy_from_flags_carries_bytes() {
    let backend = echo_backend().to_string();
    let proxy = start(
        &["tcp", "--listen", "127.0.0.1:0", "--backend", &backend],
        1,
    );
    assert_eq!(
        echo_through(proxy.addr("tcp-1"), b"ping over tcp"),
        b"ping over tcp"
    );
}

#[test]
fn a_config_file_runs_every_section() {
    let backend = echo_backend();
    let file = config_file(
        "two.toml",
        &format!(
            "[[tcp_proxy]]\nname = \"one\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\n\
             [[ws_proxy]]\nname = \"two\"\nbind = \"127.0.0.2:0\"\nbackends = [\"{backend}\"]\n"
        ),
    );
    let proxy = start(&["--config", file.to_str().unwrap()], 2);
    assert_eq!(echo_through(proxy.addr("one"), b"first"), b"first");
    // The WebSocket section answers a plain GET with a clear refusal.
    let answer = echo_through(proxy.addr("two"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
}

/// `congestion_control` (Linux): `check` shows it, and a section with it carries bytes. Reno
/// is built into every kernel. (tests/tcp.rs and tests/ws.rs check it is on the sockets.)
#[cfg(target_os = "linux")]
#[test]
fn a_section_with_a_congestion_control_shows_it_and_carries_bytes() {
    let backend = echo_backend();
    let file = config_file(
        "reno.toml",
        &format!(
            "[[tcp_proxy]]\nname = \"reno\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
             congestion_control = \"reno\"\n"
        ),
    );
    let file = file.to_str().unwrap();
    let (code, out, err) = run(&["check", "--config", file]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  TCP congestion control: reno (to clients and to backends)\n"),
        "{out}"
    );
    let proxy = start(&["--config", file], 1);
    assert_eq!(
        echo_through(proxy.addr("reno"), b"slow start"),
        b"slow start"
    );
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Waits up to `limit` for the process to exit; its status code, or None if it is still running.
fn exit_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn sigterm_stops_accepting_lets_live_tunnels_finish_then_exits_zero() {
    let backend = echo_backend();
    let file = config_file(
        "drain.toml",
        &format!("drain_timeout_ms = 10000\n[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n"),
    );
    let mut proxy = start(&["--config", file.to_str().unwrap()], 1);
    let addr = proxy.addr("tcp-1");
    let mut live = TcpStream::connect(addr).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    live.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    live.read_exact(&mut got).unwrap();

    signal(&proxy.child, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(addr).is_err(),
        "a new connection after SIGTERM is refused"
    );
    live.write_all(b"during").unwrap();
    live.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"during",
        "the live tunnel still works while draining"
    );
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_millis(300)),
        None,
        "it waits for the tunnel"
    );

    live.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_secs(5)),
        Some(0),
        "exit 0 once drained"
    );
}

#[test]
fn the_drain_deadline_closes_what_is_left_and_a_second_signal_exits_at_once() {
    let backend = echo_backend();
    let file = config_file(
        "deadline.toml",
        &format!("drain_timeout_ms = 300\n[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n"),
    );
    let mut proxy = start(&["--config", file.to_str().unwrap()], 1);
    let mut live = TcpStream::connect(proxy.addr("tcp-1")).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    live.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).unwrap();
    signal(&proxy.child, "TERM");
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_secs(3)),
        Some(0),
        "exit 0 at the deadline"
    );
    assert!(
        matches!(live.read(&mut one), Ok(0) | Err(_)),
        "the leftover tunnel was closed"
    );
    std::thread::sleep(Duration::from_millis(100));
    let log = proxy.log.lock().unwrap().clone();
    let line = log
        .iter()
        .find(|l| l.contains(" access event=closed "))
        .unwrap_or_else(|| panic!("no access line for the tunnel cut at the deadline: {log:#?}"));
    for want in [" up=1 ", " down=1 ", "end=\"drain deadline\""] {
        assert!(line.contains(want), "{want} not in {line}");
    }

    let mut proxy = start(&["--config", file.to_str().unwrap()], 1);
    let _live = TcpStream::connect(proxy.addr("tcp-1")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    signal(&proxy.child, "INT");
    std::thread::sleep(Duration::from_millis(50));
    signal(&proxy.child, "INT");
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_millis(250)),
        Some(130),
        "a second signal exits at once"
    );
}

/// A backend that greets every connection with `label` and then echoes.
fn labelled_backend(label: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut w = stream;
                let _ = w.write_all(label.as_bytes());
                let mut r = w.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Connects and returns the stream with the backend's label read off it.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut label = [0u8; 5];
    s.read_exact(&mut label).unwrap();
    (s, String::from_utf8_lossy(&label).to_string())
}

fn still_relays(s: &mut TcpStream, what: &str) {
    s.write_all(what.as_bytes()).unwrap();
    let mut got = vec![0u8; what.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, what.as_bytes());
}

#[test]
fn sighup_adds_removes_and_changes_sections_without_cutting_a_tunnel() {
    let (x, y) = (labelled_backend("b-old"), labelled_backend("b-new"));
    let before = format!(
        "[[tcp_proxy]]\nname = \"one\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{x}\"]\n\n\
         [[tcp_proxy]]\nname = \"gone\"\nlisten = \"127.0.0.4:0\"\nbackends = [\"{x}\"]\n"
    );
    let file = config_file("reload.toml", &before);
    let mut proxy = start(&["--config", file.to_str().unwrap()], 2);
    let (one, gone) = (proxy.addr("one"), proxy.addr("gone"));
    let (mut tunnel, label) = open(one);
    assert_eq!(label, "b-old");
    let (mut orphan, _) = open(gone);

    let after = format!(
        "[[tcp_proxy]]\nname = \"one\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{y}\"]\n\n\
         [[tcp_proxy]]\nname = \"two\"\nlisten = \"127.0.0.2:0\"\nbackends = [\"{y}\"]\n"
    );
    std::fs::write(&file, after).unwrap();
    signal(&proxy.child, "HUP");
    let two = proxy.wait_listening("two");
    std::thread::sleep(Duration::from_millis(200));

    assert_eq!(
        open(one).1,
        "b-new",
        "a changed section gives new connections its new backends"
    );
    assert_eq!(open(two).1, "b-new", "an added section listens");
    assert!(
        TcpStream::connect(gone).is_err(),
        "a removed section stops accepting"
    );
    still_relays(&mut tunnel, "the old tunnel of a changed section goes on");
    still_relays(&mut orphan, "the open tunnel of a removed section goes on");

    // An invalid file is refused and the running configuration stays.
    std::fs::write(
        &file,
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = []\n",
    )
    .unwrap();
    signal(&proxy.child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        open(one).1,
        "b-new",
        "still running the last good configuration"
    );
    still_relays(&mut tunnel, "and the tunnel is untouched");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the process is still up"
    );
}

#[test]
fn the_process_wide_max_connections_counts_every_section() {
    let backend = echo_backend();
    let file = config_file(
        "global.toml",
        &format!(
            "max_connections = 1\n\n[[tcp_proxy]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\n\
             [[tcp_proxy]]\nname = \"b\"\nlisten = \"127.0.0.5:0\"\nbackends = [\"{backend}\"]\n"
        ),
    );
    let proxy = start(&["--config", file.to_str().unwrap()], 2);
    let mut first = TcpStream::connect(proxy.addr("a")).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    first.write_all(b"hi").unwrap();
    let mut two = [0u8; 2];
    first.read_exact(&mut two).unwrap();
    let mut other = TcpStream::connect(proxy.addr("b")).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut one = [0u8; 1];
    assert!(
        matches!(other.read(&mut one), Ok(0) | Err(_)),
        "over the process-wide cap: closed"
    );
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        echo_through(proxy.addr("b"), b"now"),
        b"now",
        "a freed place serves again"
    );
}

/// The log lines of a proxy with the given top-level settings and one TCP section, `known`,
/// after one 12-byte echo through it.
fn log_of_one_echo(file: &str, top: &str, backend: SocketAddr) -> Vec<String> {
    let file = config_file(
        file,
        &format!(
            "{top}\n\n[[tcp_proxy]]\nname = \"known\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n"
        ),
    );
    let proxy = start(&["--config", file.to_str().unwrap()], 1);
    assert_eq!(
        echo_through(proxy.addr("known"), b"twelve bytes"),
        b"twelve bytes"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = proxy.log.lock().unwrap().clone();
    log
}

#[test]
fn the_access_log_has_the_byte_counts_of_a_known_connection_in_text_and_json() {
    let backend = echo_backend();
    for format in ["text", "json"] {
        let log = log_of_one_echo(
            &format!("access-{format}.toml"),
            &format!("log_format = \"{format}\"\nlog_open = true"),
            backend,
        );
        let pick = |event: &str| {
            log.iter()
                .find(|l| match format {
                    "json" => l.starts_with('{') && l.contains(&format!("\"event\":\"{event}\"")),
                    _ => l.contains(&format!(" access event={event} ")),
                })
                .unwrap_or_else(|| panic!("{format}: no {event} line in {log:#?}"))
                .clone()
        };
        let (opened, closed) = (pick("opened"), pick("closed"));
        let want: &[&str] = match format {
            "json" => &[
                "\"kind\":\"tcp\"",
                "\"section\":\"known\"",
                &format!("\"backend\":\"{backend}\""),
                "\"up\":12",
                "\"down\":12",
                "\"end\":\"client closed\"",
            ],
            _ => &[
                "kind=tcp",
                "section=known",
                &format!("backend={backend}"),
                " up=12 ",
                " down=12 ",
                "end=\"client closed\"",
            ],
        };
        for w in want {
            assert!(closed.contains(w), "{format}: {w} not in {closed}");
        }
        assert!(opened.contains("connect_ms"), "{opened}");
    }
}

#[test]
fn access_log_false_writes_no_access_line_and_keeps_the_others() {
    let backend = echo_backend();
    let log = log_of_one_echo(
        "access-off.toml",
        "access_log = false\nlog_open = true",
        backend,
    );
    assert!(
        log.iter().any(|l| l.contains("known")),
        "the start-up lines are still written: {log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains(" access ")), "{log:#?}");
}

/// What the proxy did while a client sent a byte through it and read it back every `gap` for
/// 300 ms, then while nothing came for 500 ms; `top` heads the config.
struct Pinged {
    /// CPU time during the pings.
    cpu: Duration,
    /// CPU time during the 500 ms after them.
    idle_cpu: Duration,
    /// `portcullis_thread_waits_total` during the pings: (polled, slept).
    waits: (f64, f64),
    /// `portcullis_thread_polling_seconds_total` during the pings.
    polling: Duration,
    /// How long the pings took.
    took: Duration,
    /// How many pings went through.
    pings: f64,
}

/// The binary with `top` heading a config of one TCP section "t" in front of an echo backend,
/// and an admin endpoint; with the endpoint's address.
fn echo_proxy_with_admin(file: &str, top: &str) -> (Running, SocketAddr) {
    let backend = echo_backend();
    let path = config_file(
        file,
        &format!(
            "{top}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[tcp_proxy]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n"
        ),
    );
    let proxy = start(&["-c", path.to_str().unwrap()], 1);
    let admin = proxy.admin(1);
    (proxy, admin)
}

fn pinged_then_idle(file: &str, top: &str, gap: Duration) -> Pinged {
    let (proxy, admin) = echo_proxy_with_admin(file, top);
    let waits = || thread_waits(admin);
    let mut client = TcpStream::connect(proxy.addr("t")).unwrap();
    client.set_nodelay(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ping = |byte: u8| {
        client.write_all(&[byte]).unwrap();
        let mut got = [0u8];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got[0], byte);
    };
    ping(0);
    let pid = proxy.child.id();
    let polling = || admin_metric(admin, "portcullis_thread_polling_seconds_total");
    let (polled, slept) = waits();
    let polling_before = polling();
    let before = cpu_time(pid);
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(300) {
        ping(1);
        pings += 1;
        std::thread::sleep(gap);
    }
    let took = start.elapsed();
    let pinged = cpu_time(pid);
    let (polled_after, slept_after) = waits();
    let polling_after = polling();
    std::thread::sleep(Duration::from_millis(500));
    let idle = cpu_time(pid);
    ping(2);
    Pinged {
        cpu: pinged - before,
        idle_cpu: idle - pinged,
        waits: (polled_after - polled, slept_after - slept),
        polling: Duration::from_secs_f64(polling_after - polling_before),
        took,
        pings: f64::from(pings),
    }
}

/// The sample `name` (with its labels, as written) from the admin endpoint at `admin`.
fn admin_metric(admin: SocketAddr, name: &str) -> f64 {
    let (_, text) = admin_get(admin, "GET", "/metrics");
    let samples = parse_prometheus(&text);
    samples.iter().find(|(n, _)| n == name).expect(name).1
}

/// `portcullis_thread_waits_total` from the admin endpoint at `admin`: (polled, slept).
fn thread_waits(admin: SocketAddr) -> (f64, f64) {
    let get = |how: &str| {
        admin_metric(
            admin,
            &format!("portcullis_thread_waits_total{{how=\"{how}\"}}"),
        )
    };
    (get("polled"), get("slept"))
}

/// How many times the threads of process `pid` have blocked (voluntary context switches).
fn voluntary_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

#[test]
fn a_wait_counts_as_slept_only_when_the_thread_really_sleeps() {
    // Polling off, so every wait that finds no work sleeps. Eight clients keep the proxy busy
    // with 4 KiB echoes, so its thread often runs out of tasks with events already queued:
    // those waits return at once and are no sleep. (Counted as sleeps, they made the metric
    // read 2.5-5x the process's blocking count here; now about 0.75x, as other threads block
    // too.)
    let (proxy, admin) = echo_proxy_with_admin("waits-busy.toml", "busy_poll_us = 0");
    let addr = proxy.addr("t");
    let pid = proxy.child.id();
    let (_, slept) = thread_waits(admin);
    let switches = voluntary_switches(pid);
    let until = Instant::now() + Duration::from_millis(500);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (out, mut back) = (vec![7u8; 4096], vec![0u8; 4096]);
                let mut echoes = 0u32;
                while Instant::now() < until {
                    s.write_all(&out).unwrap();
                    s.read_exact(&mut back).unwrap();
                    assert_eq!(back, out);
                    echoes += 1;
                }
                echoes
            })
        })
        .collect();
    let echoes: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let switches = voluntary_switches(pid) - switches;
    let slept = thread_waits(admin).1 - slept;
    assert!(echoes > 100, "only {echoes} echoes went through");
    // Every sleep counted blocked the thread (the admin request adds its own few to both).
    assert!(
        slept <= switches as f64 * 1.05 + 10.0,
        "{slept} waits counted as sleeps, but the proxy's threads blocked {switches} times \
         ({echoes} echoes)"
    );
}

#[test]
fn busy_polling_polls_while_work_comes_back_soon_and_sleeps_when_it_does_not() {
    let ms = Duration::from_millis;
    // Without polling every wait for work is a sleep.
    let off = pinged_then_idle("poll-off.toml", "busy_poll_us = 0", ms(1));
    assert_eq!(off.waits.0, 0.0, "polled with busy_poll_us = 0");
    assert_eq!(off.polling, Duration::ZERO, "polled with busy_poll_us = 0");
    assert!(
        off.waits.1 >= off.pings,
        "{:?} for {} pings",
        off.waits,
        off.pings
    );
    // The same pings, each within 5 ms of the last: the proxy polls through the gaps, and its
    // polls find the work: about 500 waits ended by polling and 12 by sleeping, here; 20 and 9
    // with two busy loops taking both cores (a starved proxy finds work waiting instead).
    let on = pinged_then_idle("poll-on.toml", "busy_poll_us = 5000", ms(1));
    let (polled, slept) = on.waits;
    assert!(
        polled > slept,
        "{polled} waits for work ended by polling, {slept} by sleeping, for {} pings",
        on.pings
    );
    // The time it polled is counted, and is most of the gaps: 293 ms of the 300 here, with
    // 290 ms of CPU (less on a busy machine, where the proxy finds work waiting).
    assert!(
        on.polling > on.took / 10 && on.polling <= on.took + ms(20),
        "{:?} counted as polling in {:?} of pings",
        on.polling,
        on.took
    );
    // (It costs CPU: about 300 ms here, against 10–30 without polling; less on a busy machine,
    // as the proxy yields the core between polls.) Then nothing for 500 ms: one last poll of
    // at most 5 ms, and it sleeps.
    assert!(
        on.idle_cpu <= ms(50),
        "{:?} of CPU in 500 ms of nothing: the polling did not stop",
        on.idle_cpu
    );
    // Pings 5 ms apart, beyond the 2 ms: polling would not catch the next ping, so the proxy
    // sleeps at once (polling 2 ms after each ping took 90 ms of CPU here).
    let far = pinged_then_idle("poll-far.toml", "busy_poll_us = 2000", ms(5));
    assert!(
        far.cpu < ms(50),
        "{:?} of CPU for pings 5 ms apart: it polled for work that came later than 2 ms",
        far.cpu
    );
    let (polled, slept) = far.waits;
    assert!(
        polled < slept,
        "{polled} waits for work ended by polling, {slept} by sleeping (15 and 110 here)"
    );
}

#[test]
fn reuse_port_lets_two_processes_share_a_port_and_without_it_the_second_fails() {
    let backend = echo_backend();
    // A free port: taken from a listener dropped at once (nothing else binds it deliberately).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = |reuse: bool| {
        config_file(
            &format!("reuse-{reuse}.toml"),
            &format!(
                "[[tcp_proxy]]\nname = \"shared\"\nlisten = \"127.0.0.1:{port}\"\nreuse_port = {reuse}\n\
                 backends = [\"{backend}\"]\n"
            ),
        )
    };
    let shared = file(true);
    let first = start(&["--config", shared.to_str().unwrap()], 1);
    let second = start(&["--config", shared.to_str().unwrap()], 1);
    for _ in 0..10 {
        assert_eq!(echo_through(first.addr("shared"), b"either"), b"either");
    }
    drop(first);
    assert_eq!(
        echo_through(second.addr("shared"), b"still served"),
        b"still served"
    );

    let alone = file(false);
    let (code, _, err) = run(&["--config", alone.to_str().unwrap()]);
    assert_eq!(code, 1, "without reuse_port the port is taken: {err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

/// A WebSocket backend speaking just enough of RFC 6455 for the proxy: it answers the upgrade
/// with the right accept key, then echoes bytes until the client closes.
fn ws_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut key = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("sec-websocket-key") {
                            key = value.trim().to_string();
                        }
                    }
                }
                let mut writer = stream;
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    portcullis::handshake::accept_key(&key)
                );
                writer.write_all(answer.as_bytes()).unwrap();
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Sends an upgrade request to `addr` and returns the stream and the response head.
fn upgrade(addr: SocketAddr, key: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let key = key.map_or(String::new(), |k| format!("Sec-WebSocket-Key: {k}\r\n"));
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: portcullis.test\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn sigterm_closes_websocket_clients_silent_for_a_second_and_finishes_the_rest() {
    let backend = ws_backend();
    let file = config_file(
        "drain-idle.toml",
        &format!(
            "drain_timeout_ms = 20000\n[[ws_proxy]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n\
             backends = [\"{backend}\"]\nread_timeout_ms = 20000\n"
        ),
    );
    let mut proxy = start(&["--config", file.to_str().unwrap()], 1);
    let addr = proxy.addr("w");
    let (mut tunnel, head) = upgrade(addr, Some("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut halfway = TcpStream::connect(addr).unwrap();
    halfway
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    halfway
        .write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    // Connected a moment before the signal: its request might be on its way.
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));

    signal(&proxy.child, "TERM");
    // The client silent for over a second is closed at once, without an answer (nginx closes
    // its idle connections the same way), rather than holding the shutdown for its 20 s read
    // timeout; the fresh one gets a second from its accept to send something.
    let began = Instant::now();
    let mut got = Vec::new();
    assert_eq!(silent.read_to_end(&mut got).unwrap(), 0);
    let idle_closed = began.elapsed();
    assert_eq!(fresh.read_to_end(&mut got).unwrap(), 0);
    let fresh_closed = began.elapsed();
    assert!(
        idle_closed < Duration::from_millis(500),
        "the idle client was closed after {idle_closed:?}"
    );
    assert!(
        (Duration::from_millis(600)..Duration::from_secs(2)).contains(&fresh_closed),
        "the fresh client was closed after {fresh_closed:?}"
    );
    // The one halfway through its request finishes its handshake; the tunnel still relays.
    halfway
        .write_all(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
    let mut answer = [0u8; 12];
    halfway.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");
    tunnel.write_all(b"still here").unwrap();
    let mut echoed = [0u8; 10];
    tunnel.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"still here");
    drop(halfway);
    drop(tunnel);
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_secs(5)),
        Some(0),
        "exit 0 once the tunnels are done"
    );
    let log = proxy.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.contains("end=\"closed at shutdown: no request yet\"")),
        "{log:#?}"
    );
}

/// One request to the admin endpoint: (status, body).
fn admin_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// Parses the Prometheus text format strictly enough to catch what a scraper would reject:
/// every sample belongs to a family declared by `# TYPE` before it, names and labels are
/// well formed, values are numbers, and histogram buckets grow up to `+Inf` = `_count`.
/// Returns each sample as (`name{labels}`, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut types: std::collections::HashMap<String, String> = Default::default();
    let mut samples = Vec::new();
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(is_name(name), "{line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("a sample: name value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(is_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels: {line}"));
            for pair in inner.split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                assert!(is_name(k), "label name {k}: {line}");
                assert!(!v.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE before {line}");
        samples.push((series.to_string(), value));
    }
    // Buckets of each histogram series grow, and +Inf equals the count.
    let mut last: std::collections::HashMap<String, f64> = Default::default();
    for (series, value) in &samples {
        if let Some((base, _)) = series.split_once("_bucket{") {
            let key = format!(
                "{base}{}",
                &series[..series.find(",le=").unwrap_or(series.len())]
            );
            let before = last.insert(key, *value).unwrap_or(0.0);
            assert!(*value >= before, "buckets shrink at {series}");
            if series.contains("le=\"+Inf\"") {
                let count = series
                    .replace("_bucket{", "_count{")
                    .replace(",le=\"+Inf\"", "");
                let c = samples.iter().find(|(s, _)| *s == count).expect("a _count");
                assert_eq!(c.1, *value, "{series}");
            }
        }
    }
    samples
}

/// Whether `addr` refuses connections, within 2 s.
fn refuses(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn sighup_moves_adds_and_removes_the_admin_endpoint() {
    let echo = echo_backend();
    let section = format!(
        "[[tcp_proxy]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{echo}\"]\n"
    );
    let with_admin = |addr: &str| format!("[admin]\nlisten = \"{addr}\"\n\n{section}");
    let file = config_file("admin_reload.toml", &section);
    let proxy = start(&["--config", file.to_str().unwrap()], 1);

    // Added.
    std::fs::write(&file, with_admin("127.0.0.9:0")).unwrap();
    signal(&proxy.child, "HUP");
    let first = proxy.admin(1);
    assert_eq!(admin_get(first, "GET", "/healthz").0, 200);

    // Moved: the new address serves, the old one closes.
    std::fs::write(&file, with_admin("127.0.0.10:0")).unwrap();
    signal(&proxy.child, "HUP");
    let second = proxy.admin(2);
    assert_eq!(admin_get(second, "GET", "/healthz").0, 200);
    assert!(refuses(first), "the old admin address still accepts");

    // An address that cannot be bound: the endpoint stays where it is, and says so.
    let taken = TcpListener::bind("127.0.0.11:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    std::fs::write(&file, with_admin(&taken_addr)).unwrap();
    signal(&proxy.child, "HUP");
    let warned = proxy.wait_log("reload: the admin endpoint stays at 127.0.0.10:0", 1);
    assert!(warned.contains(&taken_addr), "{warned}");
    assert_eq!(admin_get(second, "GET", "/healthz").0, 200);

    // Removed.
    std::fs::write(&file, &section).unwrap();
    signal(&proxy.child, "HUP");
    proxy.wait_log("reload: the admin endpoint stopped", 1);
    assert!(refuses(second), "a removed admin endpoint still accepts");
    assert_eq!(echo_through(proxy.addr("echo"), b"still up"), b"still up");
}

#[test]
fn the_admin_endpoint_serves_metrics_that_match_the_traffic_and_readiness() {
    let (echo, ws) = (echo_backend(), ws_backend());
    // A port that refuses: bound, then closed.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = config_file(
        "admin.toml",
        &format!(
            "drain_timeout_ms = 10000\n[admin]\nlisten = \"127.0.0.9:0\"\n\n\
             [[tcp_proxy]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{echo}\"]\n\n\
             [[tcp_proxy]]\nname = \"dead\"\nlisten = \"127.0.0.2:0\"\nbackends = [\"{dead}\"]\n\n\
             [[ws_proxy]]\nname = \"chat\"\nlisten = \"127.0.0.3:0\"\nmax_connections = 1\nbackends = [\"{ws}\"]\n"
        ),
    );
    let mut proxy = start(&["--config", file.to_str().unwrap()], 3);
    let admin = proxy.admin(1);
    assert_eq!(admin_get(admin, "GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(admin_get(admin, "GET", "/readyz"), (200, "ready\n".into()));
    assert_eq!(admin_get(admin, "POST", "/metrics").0, 405);
    assert_eq!(admin_get(admin, "GET", "/nope").0, 404);

    // Known traffic: three TCP tunnels of 1000, 2000 and 3000 bytes echoed.
    for n in [1000, 2000, 3000] {
        let message = vec![b'x'; n];
        assert_eq!(echo_through(proxy.addr("echo"), &message), message);
    }
    // One WebSocket tunnel held open, a second over the section's limit (503), one bad
    // request (400), then the first carries 5 bytes each way and closes.
    let chat = proxy.addr("chat");
    let (mut tunnel, head) = upgrade(chat, Some("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, full) = upgrade(chat, Some("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(full.starts_with("HTTP/1.1 503"), "{full}");
    tunnel.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    tunnel.read_exact(&mut echoed).unwrap();
    // Bytes count while the tunnel is open, not only once it ends (a tunnel open for hours
    // would show none of its traffic until then).
    let chat_bytes = |text: &str| {
        let samples = parse_prometheus(text);
        let bytes = |dir: &str| {
            let series = format!(
                "portcullis_bytes_total{{kind=\"ws\",section=\"chat\",direction=\"{dir}\"}}"
            );
            samples.iter().find(|(s, _)| *s == series).map(|(_, v)| *v)
        };
        (bytes("to_backend"), bytes("to_client"))
    };
    let open_tunnel = (Some(5.0), Some(5.0 + head.len() as f64));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let counted = chat_bytes(&admin_get(admin, "GET", "/metrics").1);
        if counted == open_tunnel {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bytes of the open tunnel counted: {counted:?}, want {open_tunnel:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tunnel.shutdown(Shutdown::Write).unwrap();
    let _ = tunnel.read_to_end(&mut Vec::new());
    drop(tunnel);
    std::thread::sleep(Duration::from_millis(100));
    let (_, bad) = upgrade(chat, None);
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    // Three connects refused by a dead backend: ejected (max_fails 3), so not ready.
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr("dead")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
    std::thread::sleep(Duration::from_millis(200));

    let (status, text) = admin_get(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    let samples = parse_prometheus(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .1
    };
    let echo_l = "kind=\"tcp\",section=\"echo\"";
    let chat_l = "kind=\"ws\",section=\"chat\"";
    let dead_l = "kind=\"tcp\",section=\"dead\"";
    let expected = [
        (format!("portcullis_connections_accepted_total{{{echo_l}}}"), 3.0),
        (format!("portcullis_connections_active{{{echo_l}}}"), 0.0),
        (format!("portcullis_bytes_total{{{echo_l},direction=\"to_backend\"}}"), 6000.0),
        (format!("portcullis_bytes_total{{{echo_l},direction=\"to_client\"}}"), 6000.0),
        (format!("portcullis_connect_duration_seconds_count{{{echo_l}}}"), 3.0),
        (format!("portcullis_backend_connections_total{{{echo_l},backend=\"{echo}\"}}"), 3.0),
        (format!("portcullis_backend_up{{{echo_l},pool=\"echo\",backend=\"{echo}\"}}"), 1.0),
        (format!("portcullis_connections_accepted_total{{{chat_l}}}"), 3.0),
        (format!("portcullis_handshakes_total{{{chat_l},status=\"101\"}}"), 1.0),
        (format!("portcullis_handshakes_total{{{chat_l},status=\"400\"}}"), 1.0),
        (format!("portcullis_handshakes_total{{{chat_l},status=\"503\"}}"), 1.0),
        (format!("portcullis_handshake_duration_seconds_count{{{chat_l}}}"), 3.0),
        (format!("portcullis_connections_refused_total{{{chat_l},reason=\"max_connections\"}}"), 1.0),
        (format!("portcullis_connections_refused_total{{{chat_l},reason=\"max_connections_per_ip\"}}"), 0.0),
        (format!("portcullis_connections_closed_total{{{dead_l},end=\"no_backend\"}}"), 3.0),
        (format!("portcullis_backend_connect_failures_total{{{dead_l},backend=\"{dead}\",reason=\"refused\"}}"), 3.0),
        (format!("portcullis_backend_up{{{dead_l},pool=\"dead\",backend=\"{dead}\"}}"), 0.0),
    ];
    for (series, want) in expected {
        assert_eq!(value(&series), want, "{series}");
    }
    // The 101 tunnel's 5 bytes each way; to the client, the backend's 101 head it passed on
    // too (as the access log's `down`); the rewritten request head is not counted.
    let up = value(&format!(
        "portcullis_bytes_total{{{chat_l},direction=\"to_backend\"}}"
    ));
    let down = value(&format!(
        "portcullis_bytes_total{{{chat_l},direction=\"to_client\"}}"
    ));
    assert_eq!((up, down), (5.0, 5.0 + head.len() as f64));
    assert!(value("process_open_fds") > 0.0);
    let (status, why) = admin_get(admin, "GET", "/readyz");
    assert_eq!(
        (status, why.as_str()),
        (503, "not ready: no healthy backend in: dead\n")
    );

    // Draining: not ready at once, still alive, exits 0 when the last tunnel ends.
    let mut held = TcpStream::connect(proxy.addr("echo")).unwrap();
    held.write_all(b"ping").unwrap();
    held.read_exact(&mut [0u8; 4]).unwrap();
    signal(&proxy.child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin_get(admin, "GET", "/readyz").1 != "not ready: draining\n" {
        assert!(Instant::now() < deadline, "readyz never said draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(admin_get(admin, "GET", "/healthz").0, 200);
    drop(held);
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_secs(5)),
        Some(0)
    );
}

/// The proxy's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s.
    Duration::from_millis((fields[11] + fields[12]) * 10)
}

/// The descriptors `pid` has open numbered below `below`. (A process out of descriptors is one
/// with none free below its limit: one inherited above it, as cargo's jobserver pipe can be,
/// takes none of that room.)
fn open_fds(pid: u32, below: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().parse::<usize>().unwrap() < below
        })
        .count()
}

#[test]
fn out_of_descriptors_it_keeps_its_tunnels_backs_off_and_serves_again_when_they_free_up() {
    let backend = echo_backend();
    let file = config_file(
        "nofile.toml",
        &format!(
            "[[tcp_proxy]]\nname = \"low\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
             [[ws_proxy]]\nname = \"pad\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
             read_timeout_ms = 60000\n"
        ),
    );
    // Headroom for about 6 tunnels (2 descriptors each) over what the idle process holds.
    let probe = start(&["--config", file.to_str().unwrap()], 2);
    let idle_fds = open_fds(probe.child.id(), usize::MAX);
    drop(probe);
    let limit = idle_fds + 14;
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
        env!("CARGO_BIN_EXE_portcullis"),
        "--config",
        file.to_str().unwrap(),
    ]);
    let mut proxy = {
        // `start` takes arguments for the binary; run it through the shell by hand here.
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line);
            }
        });
        let (_tx, lines) = mpsc::channel();
        let mut running = Running {
            child,
            lines,
            log,
            addrs: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let field = |l: &str, key: &str| {
            let value = l.split(&format!(" {key}=")).nth(1).unwrap();
            value.split_whitespace().next().unwrap().to_string()
        };
        while running.addrs.len() < 2 {
            let log = running.log.lock().unwrap().clone();
            running.addrs = log
                .iter()
                .filter(|l| l.contains(" listening "))
                .map(|l| (field(l, "name"), field(l, "addr").parse().unwrap()))
                .collect();
            assert!(Instant::now() < deadline, "no listening lines");
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    };
    let pid = proxy.child.id();
    let addr = proxy.addr("low");
    let echo_within = |s: &mut TcpStream, what: &[u8], wait: Duration| -> bool {
        s.set_read_timeout(Some(wait)).unwrap();
        if s.write_all(what).is_err() {
            return false;
        }
        let mut got = vec![0u8; what.len()];
        s.read_exact(&mut got).is_ok() && got == what
    };
    let echo = |s: &mut TcpStream, what: &[u8]| echo_within(s, what, Duration::from_secs(3));
    // Once a first tunnel has come and gone (nothing opened lazily is still to come), hold one
    // or two client connections on `pad` (1 descriptor each, waiting for a request head) so
    // that an even number of descriptors is left: the tunnels fill them exactly, and accepting
    // is what fails next. Dropping one pad later leaves exactly one to spare.
    assert!(echo(&mut TcpStream::connect(addr).unwrap(), b"warm"));
    let settled = || {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let n = open_fds(pid, limit);
            std::thread::sleep(Duration::from_millis(50));
            if n == open_fds(pid, limit) {
                return n;
            }
            assert!(Instant::now() < deadline, "descriptors never settled");
        }
    };
    let free = limit - settled();
    let mut pads: Vec<_> = (0..2 - free % 2)
        .map(|_| TcpStream::connect(proxy.addr("pad")).unwrap())
        .collect();
    let room = (free - pads.len()) / 2;
    let deadline = Instant::now() + Duration::from_secs(3);
    while limit - open_fds(pid, limit) != room * 2 {
        assert!(Instant::now() < deadline, "the pads were not accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Fill every descriptor, and then some: connections past the limit wait in the backlog.
    let mut tunnels = Vec::new();
    for i in 0..12 {
        let mut s = TcpStream::connect(addr).unwrap();
        let ok = echo_within(
            &mut s,
            format!("tunnel {i}").as_bytes(),
            Duration::from_millis(500),
        );
        tunnels.push((s, ok));
    }
    let served = tunnels.iter().filter(|(_, ok)| *ok).count();
    assert!(
        (room - 1..=room).contains(&served) && room < 12,
        "{served} tunnels served with room for {room}"
    );
    // Exhausted (accepting fails): it backs off, does not spin, and its tunnels still carry
    // bytes.
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(200),
        "{spent:?} of CPU in 2 s while exhausted"
    );
    for (s, _) in tunnels.iter_mut().filter(|(_, ok)| *ok) {
        assert!(echo(s, b"still here"), "an established tunnel stopped");
    }
    // One descriptor to spare: the connections waiting in the backlog are accepted one at a
    // time and their backend connect fails. Each is refused and closed, said once a second
    // (not once a connection), and not held against the backend.
    drop(pads.pop());
    let refusal_lines = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains("reason=\"out of file descriptors\""))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while refusal_lines(&proxy.log.lock().unwrap()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = proxy.log.lock().unwrap().clone();
    let refusals = refusal_lines(&log);
    assert!(
        (1..=3).contains(&refusals),
        "{refusals} refusal lines: {log:#?}"
    );
    // Accepting failed: after each refusal (which frees the descriptor the next accept takes),
    // or for as long as the tunnels held them all. Logged once a second at most, with a count.
    let failure_lines: Vec<&String> = log.iter().filter(|l| l.contains("accept failed")).collect();
    assert!(!failure_lines.is_empty(), "no accept failure: {log:#?}");
    let at_ms = |l: &str| -> i64 {
        // "2026-11-29T14:31:21.813Z WARN …": the time of day, in ms.
        let stamp = l.split_whitespace().next().unwrap();
        let parts: Vec<f64> = stamp[stamp.find('T').unwrap() + 1..]
            .trim_end_matches('Z')
            .split(':')
            .map(|p| p.parse().unwrap())
            .collect();
        ((parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]) * 1000.0).round() as i64
    };
    for pair in failure_lines.windows(2) {
        let apart = at_ms(pair[1]) - at_ms(pair[0]);
        assert!(
            !(0..990).contains(&apart),
            "accept failures logged {apart} ms apart: {failure_lines:#?}"
        );
    }
    assert!(
        !log.iter().any(|l| l.contains("backend down")),
        "its own exhaustion was held against the backend: {log:#?}"
    );
    // Descriptors free up: served again at once (the backend was never ejected), and the
    // connections that waited in the backlog are served or were refused, none left hanging.
    let (alive, waiting): (Vec<_>, Vec<_>) = tunnels.into_iter().partition(|(_, ok)| *ok);
    drop(alive);
    // (The tunnels' descriptors are freed as their closes go through, within milliseconds.)
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut fresh = TcpStream::connect(addr).unwrap();
        if echo(&mut fresh, b"served again") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving after the exhaustion"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, (mut s, _)) in waiting.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let ended = s.read_to_end(&mut got);
        let want = format!("tunnel {}", served + i).into_bytes();
        assert!(
            ended.is_err() || got.is_empty() || got == want,
            "a waiting connection got {got:?}"
        );
    }
    // (The pad still open has sent nothing: the drain closes it at once.)
    signal(&proxy.child, "TERM");
    assert_eq!(
        exit_within(&mut proxy.child, Duration::from_secs(5)),
        Some(0)
    );
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 64 && exec \"$0\" tcp --listen 127.0.0.1:0 --backend 127.0.0.1:9",
            env!("CARGO_BIN_EXE_portcullis"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(4).unwrap().to_string())
        .unwrap();
    // Once the shell has become the proxy, and the proxy has had a moment to start.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap() != "portcullis\n" {
        assert!(Instant::now() < deadline, "never became portcullis");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft = line.split_whitespace().nth(3).unwrap().to_string();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, hard, "soft limit after start");
}
