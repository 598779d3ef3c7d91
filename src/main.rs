//! The `portcullis` command: run a config file, check one, or start a one-off proxy from flags.

use std::process::ExitCode;

use argh::FromArgs;
use portcullis::{Config, Error, TcpProxy};

/// A small, fast reverse proxy for WebSocket and raw TCP traffic.
#[derive(FromArgs, Debug)]
struct Cli {
    /// run every section of this TOML config file
    #[argh(option, short = 'c')]
    config: Option<String>,

    /// print the version and exit
    #[argh(switch, short = 'V')]
    version: bool,

    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Check(Check),
    Tcp(Tcp),
    Ws(Ws),
    Demo(Demo),
}

/// Validate a config file and print what would run; exit 2 if it is invalid.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
struct Check {
    /// the TOML config file to check
    #[argh(option, short = 'c')]
    config: String,
}

/// Run a one-off TCP proxy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "tcp")]
struct Tcp {
    /// address to listen on, host:port
    #[argh(option)]
    listen: String,

    /// a backend, host:port (repeat for several; round robin with failover)
    #[argh(option)]
    backend: Vec<String>,

    /// connect timeout per backend in milliseconds (default 5000)
    #[argh(option, default = "portcullis::tcp::DEFAULT_CONNECT_TIMEOUT_MS")]
    connect_timeout_ms: u64,
}

/// Run a one-off WebSocket proxy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ws")]
struct Ws {
    /// address to listen on, host:port
    #[argh(option)]
    listen: String,

    /// a backend, host:port or ws://host:port/path (repeat for several)
    #[argh(option)]
    backend: Vec<String>,

    /// connect timeout per backend in milliseconds (default 5000)
    #[argh(option, default = "portcullis::tcp::DEFAULT_CONNECT_TIMEOUT_MS")]
    connect_timeout_ms: u64,

    /// how long a client may take to send its request head, in milliseconds (default 30000)
    #[argh(option, default = "portcullis::config::DEFAULT_READ_TIMEOUT_MS")]
    read_timeout_ms: u64,
}

/// Start a built-in echo backend with a TCP proxy in front of it, and show how to connect.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "demo")]
struct Demo {
    /// address the proxy listens on (default 127.0.0.1:7000)
    #[argh(option, default = "String::from(\"127.0.0.1:7000\")")]
    listen: String,
}

/// Raises the soft limit on open files to the hard limit, as nginx's `worker_rlimit_nofile`
/// and Go's runtime do: every tunnel holds two descriptors, and the usual soft limit of 1024
/// would stop the proxy near 500 tunnels where the hard limit allows far more. Failing
/// changes nothing: the proxy then refuses what it cannot serve.
#[cfg(unix)]
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            limit.current = Some(hard);
            let _ = setrlimit(Resource::Nofile, limit);
        }
    }
}

/// Exit status for a usage or configuration error, as most Unix tools use.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .map_or("portcullis", |s| s.rsplit('/').next().unwrap_or(s));
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let cli = match Cli::from_args(&[name], &rest) {
        Ok(cli) => cli,
        Err(early) => {
            // `--help` is a success; anything else is a usage error.
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}\nRun {name} --help for usage.", early.output.trim_end());
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    if cli.version {
        println!("portcullis {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    #[cfg(unix)]
    raise_open_file_limit();
    let result = match (cli.command, cli.config) {
        (Some(_), Some(_)) => usage(name, "--config goes with no subcommand (or after `check`)"),
        (None, None) => usage(
            name,
            "give --config FILE, or a subcommand: check, tcp, demo",
        ),
        (None, Some(file)) => Config::load(&file).and_then(|c| {
            portcullis::run_reloading(c, move || Config::load(&file), hangups(), signals())
        }),
        (Some(Command::Check(c)), None) => check(&c.config),
        (Some(Command::Tcp(t)), None) => tcp(t),
        (Some(Command::Ws(w)), None) => ws(w),
        (Some(Command::Demo(d)), None) => demo(&d.listen),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ Error::Config(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(name: &str, why: &str) -> Result<(), Error> {
    Err(Error::Config(format!("{why}; run {name} --help for usage")))
}

fn check(file: &str) -> Result<(), Error> {
    let config = Config::load(file)?;
    println!("{file}: ok, {} listener(s)", config.listeners());
    print!("{config}");
    Ok(())
}

fn tcp(t: Tcp) -> Result<(), Error> {
    let toml = section(
        "tcp_proxy",
        &t.listen,
        &t.backend,
        &format!("connect_timeout_ms = {}", t.connect_timeout_ms),
    );
    run_flags(&toml)
}

fn ws(w: Ws) -> Result<(), Error> {
    let timeouts = format!(
        "connect_timeout_ms = {}\nread_timeout_ms = {}",
        w.connect_timeout_ms, w.read_timeout_ms
    );
    run_flags(&section("ws_proxy", &w.listen, &w.backend, &timeouts))
}

/// The flags of a one-off proxy as a config section, so they go through the same validation as
/// a file and both refuse the same things with the same words.
fn section(table: &str, listen: &str, backends: &[String], more: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[[{table}]]\nlisten = {listen:?}\nbackends = [{}]\n{more}\n",
        list.join(", ")
    )
}

fn run_flags(toml: &str) -> Result<(), Error> {
    let config = Config::parse(toml, "command line").map_err(|e| {
        // Speak of flags, not of the TOML the flags were turned into.
        let msg = e.to_string();
        let msg = msg.split_once(" #1, ").map_or(msg.as_str(), |(_, m)| m);
        Error::Config(
            msg.replace("field `backends`", "--backend")
                .replace("field `listen`", "--listen")
                .replace("field `connect_timeout_ms`", "--connect-timeout-ms")
                .replace("field `read_timeout_ms`", "--read-timeout-ms"),
        )
    })?;
    portcullis::run_until(config, signals())
}

/// A message for every SIGHUP: each one reloads the config file.
fn hangups() -> async_channel::Receiver<()> {
    let (tx, rx) = async_channel::unbounded();
    match async_signal::Signals::new([async_signal::Signal::Hup]) {
        Ok(mut hups) => {
            std::thread::spawn(move || {
                smol::block_on(async {
                    use futures_lite::StreamExt;
                    while hups.next().await.is_some() {
                        eprintln!("received SIGHUP: reloading the config file");
                        if tx.send(()).await.is_err() {
                            break;
                        }
                    }
                })
            });
        }
        Err(e) => eprintln!("warning: cannot handle SIGHUP ({e}); reloads are off"),
    }
    rx
}

/// Completes at the first SIGTERM or SIGINT, after which the proxy drains; a second one ends
/// the process at once, for an operator who cannot wait.
async fn signals() {
    use async_signal::{Signal, Signals};
    use futures_lite::StreamExt;
    let Ok(mut signals) = Signals::new([Signal::Term, Signal::Int]) else {
        eprintln!("warning: cannot handle SIGTERM/SIGINT; they will end the process at once");
        return futures_lite::future::pending().await;
    };
    let name = match signals.next().await {
        Some(Ok(Signal::Int)) => "SIGINT",
        _ => "SIGTERM",
    };
    eprintln!("received {name}: draining; send it again to exit at once");
    std::thread::spawn(move || {
        smol::block_on(signals.next());
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

fn demo(listen: &str) -> Result<(), Error> {
    let echo = std::net::TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    std::thread::spawn(move || {
        smol::block_on(async {
            let echo = async_net::TcpListener::try_from(echo).expect("a bound listener");
            loop {
                let Ok((stream, _)) = echo.accept().await else {
                    continue;
                };
                smol::spawn(async move {
                    let mut writer = stream.clone();
                    let _ = futures_lite::io::copy(stream, &mut writer).await;
                    let _ = futures_lite::AsyncWriteExt::close(&mut writer).await;
                })
                .detach();
            }
        })
    });
    eprintln!(
        "portcullis demo: an echo server on {echo_addr}, and the proxy in front of it on {listen}.\n\
         Try it from another terminal:  nc {}   (type a line; it comes back through the proxy)\n\
         Stop with Ctrl-C.",
        listen.replace(':', " ")
    );
    TcpProxy::new([echo_addr.to_string()])
        .name("demo")
        .bind(listen)
}
