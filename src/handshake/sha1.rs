//! SHA-1 (RFC 3174), for the one place WebSocket needs it: `Sec-WebSocket-Accept`.
//!
//! SHA-1 is broken for collision resistance, but RFC 6455 uses it only to show that the server
//! read the client's key; nothing here rests on it being secure. It is written out rather than
//! taken from a crate because the project keeps its dependencies to smol and a few parsers, and
//! the whole algorithm is this page.

/// The SHA-1 digest of `data`.
pub(crate) fn sha1(data: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        compress(&mut state, block);
    }
    // Padding: a 1 bit, zeros, then the message length in bits as a big-endian u64, filling one
    // block, or two when fewer than 9 bytes are left in the first.
    let rest = blocks.remainder();
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let end = if rest.len() < 56 { 64 } else { 128 };
    let bits = (data.len() as u64).wrapping_mul(8);
    tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
    for block in tail[..end].chunks_exact(64) {
        compress(&mut state, block);
    }
    let mut digest = [0u8; 20];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// Mixes one 64-byte block into `state` (RFC 3174 §6.1).
fn compress(state: &mut [u32; 5], block: &[u8]) {
    let mut w = [0u32; 80];
    for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
        *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    for t in 16..80 {
        w[t] = (w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16]).rotate_left(1);
    }
    let [mut a, mut b, mut c, mut d, mut e] = *state;
    for (t, word) in w.iter().enumerate() {
        let (f, k) = match t {
            0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
            20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
            40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
            _ => (b ^ c ^ d, 0xCA62_C1D6),
        };
        let temp = a
            .rotate_left(5)
            .wrapping_add(f)
            .wrapping_add(e)
            .wrapping_add(k)
            .wrapping_add(*word);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = temp;
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e]) {
        *s = s.wrapping_add(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(digest: [u8; 20]) -> String {
        digest.iter().map(|b| format!("{b:02X}")).collect()
    }

    #[test]
    fn rfc_3174_test_vectors() {
        let cases: &[(Vec<u8>, &str)] = &[
            (b"abc".to_vec(), "A9993E364706816ABA3E25717850C26C9CD0D89D"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".to_vec(),
                "84983E441C3BD26EBAAE4AA1F95129E5E54670F1",
            ),
            (
                vec![b'a'; 1_000_000],
                "34AA973CD4C4DAA4F61EEB2BDBAD27316534016F",
            ),
            (
                b"0123456701234567012345670123456701234567012345670123456701234567".repeat(10),
                "DEA356A2CDDD90C7A7ECEDC5EBB563934F460452",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                hex(sha1(input)),
                *expected,
                "input of {} bytes",
                input.len()
            );
        }
    }

    #[test]
    fn padding_boundaries() {
        // Lengths around the one-or-two padding blocks split (55/56) and a full block (64).
        let cases: &[(usize, &str)] = &[
            (0, "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709"),
            (55, "C1C8BBDC22796E28C0E15163D20899B65621D65A"),
            (56, "C2DB330F6083854C99D4B5BFB6E8F29F201BE699"),
            (64, "0098BA824B5C16427BD7A1122A5A442A25EC644D"),
        ];
        for (len, expected) in cases {
            assert_eq!(
                hex(sha1(&vec![b'a'; *len])),
                *expected,
                "{len} bytes of 'a'"
            );
        }
    }
}
