//! Half-close through the proxy, both ways, under random latency: a side that has finished
//! writing shuts down its write half (a FIN), and the other direction keeps working until it
//! too is closed. Every byte must arrive once and in order, each side must see end of file
//! exactly where the other closed, and the proxy must close both sockets afterwards.

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use portcullis::TcpProxy;
use sim::{
    check_prefix, connect_proxy, no_streams_left_on, pattern, read_until, run_seeds, serve_proxy,
};
use sim::{test_name, wait_for, End, Rng, BACKEND_PORT};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use turmoil::net::TcpListener;

/// The client's bytes are stream 1, the backend's stream 2.
const REQUEST: u64 = 1;
const REPLY: u64 = 2;

/// Who shuts down its write half first.
#[derive(Clone, Copy, PartialEq, Debug)]
enum First {
    /// The client sends its request and half-closes; the backend reads to end of file, then
    /// replies and closes.
    Client,
    /// The backend sends its reply and half-closes; the client reads to end of file, then sends
    /// its request and closes.
    Backend,
}

/// Writes `len` bytes of `stream` in random chunks with random pauses, so they cross the
/// network in many segments, then shuts down the write half.
async fn send_paced<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream: u64,
    len: usize,
    rng: &mut Rng,
) -> std::io::Result<()> {
    let mut offset = 0;
    while offset < len {
        let n = (rng.range(1, 20_000) as usize).min(len - offset);
        w.write_all(&pattern(stream, offset as u64, n)).await?;
        offset += n;
        if rng.chance(0.5) {
            tokio::time::sleep(rng.millis(0, 10)).await;
        }
    }
    w.shutdown().await
}

/// Reads to end of file (within 10 s) and checks that exactly `len` bytes of `stream` came.
async fn receive_all<R: AsyncRead + Unpin>(
    r: &mut R,
    stream: u64,
    len: usize,
    who: &str,
) -> Result<(), String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let end = read_until(r, &mut got, None, deadline).await;
    check_prefix(stream, &got).map_err(|e| format!("{who}: {e}"))?;
    if end != Some(End::Eof) || got.len() != len {
        return Err(format!(
            "{who} expected {len} bytes then end of file, got {} bytes then {end:?}",
            got.len()
        ));
    }
    Ok(())
}

fn half_close(seed: u64, first: First) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let request_len = rng.range(1, 200_000) as usize;
    let reply_len = rng.range(1, 200_000) as usize;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(rng.millis(1, 50))
        .enable_random_order()
        .simulation_duration(Duration::from_secs(60))
        .build();

    // What the backend concluded about the request it received.
    let backend_verdict: Rc<RefCell<Option<Result<(), String>>>> = Rc::default();
    let verdict = backend_verdict.clone();
    let backend_seed = rng.next_u64();
    sim.host("backend", move || {
        let verdict = verdict.clone();
        async move {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).await?;
            let (mut s, _) = listener.accept().await?;
            let mut rng = Rng::new(backend_seed);
            let result = match first {
                First::Client => {
                    let got = receive_all(&mut s, REQUEST, request_len, "backend").await;
                    if got.is_ok() {
                        send_paced(&mut s, REPLY, reply_len, &mut rng).await?;
                    }
                    got
                }
                First::Backend => {
                    send_paced(&mut s, REPLY, reply_len, &mut rng).await?;
                    receive_all(&mut s, REQUEST, request_len, "backend").await
                }
            };
            *verdict.borrow_mut() = Some(result);
            drop(s);
            std::future::pending().await
        }
    });
    sim.host("proxy", || {
        serve_proxy(TcpProxy::new([format!("backend:{BACKEND_PORT}")]).connect_timeout_ms(1000))
    });

    let mut client_rng = Rng::new(rng.next_u64());
    sim.client("client", async move {
        let mut s = connect_proxy().await?;
        let mine = match first {
            First::Client => {
                send_paced(&mut s, REQUEST, request_len, &mut client_rng).await?;
                receive_all(&mut s, REPLY, reply_len, "client").await
            }
            First::Backend => {
                let got = receive_all(&mut s, REPLY, reply_len, "client").await;
                if got.is_ok() {
                    send_paced(&mut s, REQUEST, request_len, &mut client_rng).await?;
                }
                got
            }
        };
        if let Err(e) = mine {
            let backend = backend_verdict.borrow();
            return Err(format!("{e} (the backend's verdict: {backend:?})").into());
        }
        let decided = || backend_verdict.borrow().is_some();
        if !wait_for(decided, Duration::from_secs(10)).await {
            return Err("the backend never saw the end of the request".into());
        }
        backend_verdict.borrow_mut().take().expect("decided")?;
        drop(s);
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        Ok(())
    });
    sim.run()
}

#[test]
fn client_half_close_under_random_latency_reaches_the_backend_and_the_reply_comes_back_intact() {
    run_seeds(test_name!(), |seed| half_close(seed, First::Client));
}

#[test]
fn backend_half_close_under_random_latency_reaches_the_client_and_the_request_still_goes_through() {
    run_seeds(test_name!(), |seed| half_close(seed, First::Backend));
}
