//! portcullis: a small, fast reverse proxy for WebSocket and raw TCP traffic, on smol.
//!
//! The map:
//!
//! - [`net`]: the runtime seam ([`Net`], [`Listener`]) and its smol implementation
//!   ([`SmolNet`]). Every flow is generic over it, so the same code runs under turmoil in `sim/`.
//! - [`relay`]: the bidirectional copy of an established tunnel ([`Relay`]).
//! - [`balancer`]: backend pools and selection ([`Pool`], [`Backend`]).
//! - [`health`]: passive and active backend health, and the active checker.
//! - [`limit`]: connection limits per section, per client IP and per process.
//! - [`policy`]: the selection algorithms (smooth weighted round robin, least connections,
//!   consistent hashing with bounded load, random).
//! - [`proxy_protocol`]: PROXY protocol v1/v2, encoding and parsing.
//! - [`tcp`]: the L4 flow and its builder ([`TcpProxy`]).
//! - [`handshake`]: the HTTP/1.1 upgrade: reading heads, validation, header rewriting.
//! - `route`: which WebSocket route a request takes, and the path its backend sees.
//! - [`ws`]: the WebSocket flow and its builder ([`WsProxy`]).
//! - [`tls`]: TLS on listeners and to backends, and SNI read from a raw ClientHello (the `tls`
//!   cargo feature; SNI reading works without it).
//! - [`config`]: the TOML file ([`Config`]) and its validation.
//! - [`metrics`]: Prometheus counters, gauges and histograms per section and backend.
//! - `admin`: the admin endpoint: `/metrics`, `/healthz`, `/readyz`.
//! - `server`: the accept loop shared by every flow: back-off, spawning, drain.
//! - [`Error`]: the one error type.
//!
//! # Examples
//!
//! ```no_run
//! portcullis::TcpProxy::new(["127.0.0.1:6379"]).bind("127.0.0.1:6380")?;
//! # Ok::<(), portcullis::Error>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod log;
#[cfg(test)]
mod testio;

mod admin;
pub mod balancer;
pub mod config;
mod error;
pub mod handshake;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
mod reactor;
pub mod relay;
mod route;
mod server;
pub mod tcp;
pub mod tls;
pub mod ws;

pub use balancer::{Backend, Pool};
pub use config::Config;
pub use error::Error;
pub use net::{Listener, Net, SmolListener, SmolNet, SmolStream};
pub use relay::{Relay, Report, Side};
pub use server::{run, run_reloading, run_until};
pub use tcp::TcpProxy;
pub use ws::WsProxy;
