//! The backend's answer: its head read from a segmented stream, judged against a forwarded
//! request, and a chunked body measured. Never a panic, never past the input.
#![no_main]

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use portcullis::handshake::{
    chunked_body_len, forward, parse_request, read_head, ForwardOptions, Forwarded, Incoming,
    Response,
};
use portcullis_fuzz::{head_end, Segments};

fn forwarded() -> Forwarded {
    let head = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let Ok(Incoming::Upgrade(request)) = parse_request(head) else {
        unreachable!()
    };
    forward(
        &request,
        "/chat",
        "b:1",
        [127, 0, 0, 1].into(),
        &ForwardOptions::default(),
    )
    .unwrap()
}

fuzz_target!(|input: &[u8]| {
    let sent = forwarded();
    // The raw input as a head, whatever it holds.
    let _ = sent.check_response(input);
    if let Some(n) = chunked_body_len(input) {
        assert!(n <= input.len());
    }
    // As a stream: the head, then a body.
    let mut peer = Segments::from_input(input);
    let stream = peer.data.clone();
    let Ok(head) = block_on(read_head(&mut peer, 8192)) else {
        return;
    };
    assert_eq!(Some(head.bytes.len()), head_end(&stream));
    let body: Vec<u8> = head.rest.iter().chain(peer.unread()).copied().collect();
    assert_eq!(&body[..], &stream[head.bytes.len()..]);
    match sent.check_response(&head.bytes) {
        Ok(Response::Refused { chunked: true, .. }) => {
            if let Some(n) = chunked_body_len(&body) {
                assert!(n <= body.len());
            }
        }
        Ok(Response::Refused { status, .. }) => assert_ne!(status, 101),
        Ok(Response::Accepted) | Err(_) => {}
    }
});
