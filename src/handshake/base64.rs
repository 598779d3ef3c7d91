//! Base64 (RFC 4648 §4, the standard alphabet with padding): encoding for
//! `Sec-WebSocket-Accept`, strict decoding for checking `Sec-WebSocket-Key`.
//!
//! Decoding is strict on purpose: padding is required, nothing but the alphabet is accepted and
//! the unused bits of the last character must be zero, so every accepted key has exactly one
//! spelling (RFC 4648 §3.5). A real client's key comes from a standard encoder and always passes.

/// The standard alphabet (RFC 4648 table 1).
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `data` in base64 with padding.
pub(crate) fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = byte(0) << 16 | byte(1) << 8 | byte(2);
        // n input bytes give n + 1 significant characters; the rest of the four is padding.
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes `text` encodes, or `None` unless it is canonical padded base64.
pub(crate) fn decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let groups = text.len() / 4;
    let mut out = Vec::with_capacity(groups * 3);
    for (g, quad) in text.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return None;
        }
        let mut group = 0u32;
        for &c in &quad[..4 - pad] {
            group = group << 6 | value(c)?;
        }
        group <<= 6 * pad;
        let [_, b0, b1, b2] = group.to_be_bytes();
        let bytes = [b0, b1, b2];
        let kept = 3 - pad;
        // Bits the padding says are unused must be zero, or two spellings would decode alike.
        if bytes[kept..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..kept]);
    }
    Some(out)
}

/// The 6-bit value of one alphabet character.
fn value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4648 §10.
    const VECTORS: &[(&str, &str)] = &[
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc_4648_test_vectors_encode() {
        for (plain, encoded) in VECTORS {
            assert_eq!(encode(plain.as_bytes()), *encoded, "{plain:?}");
        }
    }

    #[test]
    fn rfc_4648_test_vectors_decode() {
        for (plain, encoded) in VECTORS {
            assert_eq!(
                decode(encoded.as_bytes()).as_deref(),
                Some(plain.as_bytes()),
                "{encoded:?}"
            );
        }
    }

    #[test]
    fn every_byte_value_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        for len in 0..all.len() {
            let data = &all[..len];
            assert_eq!(decode(encode(data).as_bytes()).as_deref(), Some(data));
        }
    }

    #[test]
    fn decode_refuses_non_canonical_input() {
        let cases: &[&str] = &[
            "Zg",        // padding missing
            "Zg=",       // length not a multiple of 4
            "Zh==",      // unused bits set ('h' leaves 0001 after the first 2 bits)
            "Zm9=",      // unused bits set in the two-byte form
            "Z===",      // three padding characters
            "Zg==Zm9v",  // padding before the end
            "Zm9v Zg==", // a space
            "Zm9\n",     // a line break
            "Zm-v",      // URL-safe alphabet
            "Zm_v",      // URL-safe alphabet
            "=Zm9",      // padding first
            "Zm=v",      // padding in the middle of a group
        ];
        for text in cases {
            assert_eq!(decode(text.as_bytes()), None, "{text:?}");
        }
    }
}
