//! The client's request head: read from a segmented stream under a cap, then parsed, validated
//! and forwarded. Never a panic; never more than the cap read; the bytes after the head kept for
//! the relay; an accepted upgrade forwards to a head that is still one valid upgrade.
#![no_main]

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use portcullis::handshake::{
    forward, parse_request, read_head, ForwardOptions, HeadError, Incoming, Refusal,
};
use portcullis_fuzz::{head_end, Segments};

fuzz_target!(|input: &[u8]| {
    // The first two bytes choose the cap (up to 4 KiB), the rest is segments and stream.
    let (max, input) = match input {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b]) % 4096), rest),
        _ => (8192, input),
    };
    let mut peer = Segments::from_input(input);
    let stream = peer.data.clone();
    let end = head_end(&stream);
    let head = match block_on(read_head(&mut peer, max)) {
        Ok(head) => head,
        Err(HeadError::TooLarge) => {
            assert!(peer.at <= max);
            assert!(end.is_none_or(|e| e > max));
            // The validator must survive whatever the cap cut off, too.
            let _ = parse_request(&stream);
            return;
        }
        Err(HeadError::Eof { received }) => {
            assert_eq!(received, stream.len());
            assert!(end.is_none());
            let _ = parse_request(&stream);
            return;
        }
        Err(HeadError::Io(e)) => panic!("I/O error from an in-memory stream: {e}"),
    };
    assert!(peer.at <= max, "read {} with a cap of {max}", peer.at);
    assert_eq!(Some(head.bytes.len()), end);
    assert_eq!(&head.bytes[..], &stream[..head.bytes.len()]);
    let after: Vec<u8> = head.rest.iter().chain(peer.unread()).copied().collect();
    assert_eq!(&after[..], &stream[head.bytes.len()..]);

    let Ok(Incoming::Upgrade(request)) = parse_request(&head.bytes) else {
        return;
    };
    let options = ForwardOptions::default();
    let Ok(sent) = forward(
        &request,
        request.target(),
        "10.0.0.5:9000",
        [192, 0, 2, 1].into(),
        &options,
    ) else {
        return;
    };
    // One head, nothing smuggled behind it: its only blank line is its end.
    assert_eq!(head_end(&sent.head), Some(sent.head.len()));
    match parse_request(&sent.head) {
        Ok(Incoming::Upgrade(again)) => assert_eq!(again.target(), request.target()),
        // The proxy's own X-Forwarded-* lines can take a head of 98+ lines past the limit.
        Err(Refusal::TooManyHeaders) => {}
        other => panic!("the forwarded head is not a valid upgrade: {other:?}"),
    }
});
