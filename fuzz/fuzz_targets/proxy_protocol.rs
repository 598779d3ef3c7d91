//! The PROXY protocol parser, on a buffer and on a segmented stream. Never a panic; a header
//! never longer than the input or the bound; a stream's bytes after the header kept; a parsed
//! header's addresses encode back to a header that parses to the same addresses.
#![no_main]

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use portcullis::proxy_protocol::{encode, parse, read_header, Parsed, Version, MAX_HEADER_LEN};
use portcullis_fuzz::Segments;

fuzz_target!(|input: &[u8]| {
    if let Ok(Parsed::Complete {
        header_len,
        addresses,
    }) = parse(input)
    {
        assert!(header_len <= input.len());
        assert!(header_len <= MAX_HEADER_LEN);
        // The same header whatever follows it.
        let mut more = input[..header_len].to_vec();
        more.extend_from_slice(b"\x00tail");
        assert_eq!(
            parse(&more),
            Ok(Parsed::Complete {
                header_len,
                addresses
            })
        );
        if let Some((source, destination)) = addresses {
            assert_eq!(source.is_ipv4(), destination.is_ipv4());
            for version in [Version::V1, Version::V2] {
                let header = encode(version, source, destination);
                assert_eq!(
                    parse(&header),
                    Ok(Parsed::Complete {
                        header_len: header.len(),
                        addresses
                    })
                );
            }
        }
    }

    let mut peer = Segments::from_input(input);
    let stream = peer.data.clone();
    let got = block_on(read_header(&mut peer));
    assert!(peer.at <= MAX_HEADER_LEN);
    if let Ok((addresses, rest)) = got {
        let Ok(Parsed::Complete {
            header_len,
            addresses: parsed,
        }) = parse(&stream)
        else {
            panic!("read_header found a header that parse does not");
        };
        assert_eq!(addresses, parsed);
        assert_eq!(header_len + rest.len(), peer.at);
        assert_eq!(&rest[..], &stream[header_len..peer.at]);
    }
});
