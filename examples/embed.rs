//! Embedding portcullis in a smol application: an echo backend and a TCP proxy in front of it,
//! both on the application's own executor, stopped with a shutdown signal.
//!
//! Run it with `cargo run --example embed`; it sends one message through the proxy, prints
//! what came back and the byte counts, then shuts the proxy down (draining) and exits.

use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ex = Arc::new(smol::Executor::new());
    smol::block_on(ex.run(async {
        // An echo backend on a free loopback port.
        let backend = async_net::TcpListener::bind("127.0.0.1:0").await?;
        let backend_addr = backend.local_addr()?;
        ex.spawn(async move {
            while let Ok((stream, _)) = backend.accept().await {
                smol::spawn(async move {
                    let mut writer = stream.clone();
                    let _ = futures_lite::io::copy(stream, &mut writer).await;
                    let _ = writer.close().await;
                })
                .detach();
            }
        })
        .detach();

        // The proxy, with a shutdown signal the application controls.
        let listener = async_net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let proxy = portcullis::TcpProxy::new([backend_addr.to_string()])
            .name("embedded")
            .drain_timeout_ms(1_000)
            .serve(listener, async move {
                let _ = stopped.recv().await;
            });
        let proxy = ex.spawn(proxy);

        // A client through the proxy.
        let mut client = async_net::TcpStream::connect(proxy_addr).await?;
        client.write_all(b"hello through portcullis").await?;
        client.close().await?;
        let mut echoed = String::new();
        client.read_to_string(&mut echoed).await?;
        println!("proxy {proxy_addr} -> backend {backend_addr}: {echoed:?}");

        drop(stop);
        proxy.await?;
        println!("proxy stopped");
        Ok(())
    }))
}
