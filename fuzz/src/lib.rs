//! What the fuzz targets share: a peer that sends a stream in segments chosen by the input.

#[path = "../../tests/common/segments.rs"]
mod segments;
pub use segments::Segments;

impl Segments {
    /// Splits a fuzz input into segment sizes (its first bytes, as many as the first says, up
    /// to 8) and the stream (the rest).
    pub fn from_input(input: &[u8]) -> Self {
        let Some((&n, rest)) = input.split_first() else {
            return Segments::new(&[], []);
        };
        let n = usize::from(n % 8).min(rest.len());
        let (sizes, data) = rest.split_at(n);
        Segments::new(data, sizes.iter().map(|&s| usize::from(s)))
    }
}

/// The offset just past the first `\r\n\r\n` in `bytes`.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}
