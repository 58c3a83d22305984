//! Dense bit packing of unsigned b-bit codes (2 ≤ b ≤ 8) into little-endian u32 words, row by row
//! (the compressed-tensors ≥ 0.18 layout, formats.md §1.2): element `i` of a row occupies bits
//! `i·b .. i·b + b` of the row's bit stream, low bits first; a value may straddle two words; each
//! row starts on a fresh word, so a row of `n` codes takes `ceil(n·b / 32)` words.

/// Words per packed row.
pub fn words_per_row(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Packs `rows × n` codes.
pub fn pack(codes: &[u8], n: usize, bits: u8) -> Vec<u32> {
    assert!((2..=8).contains(&bits) && n > 0 && codes.len().is_multiple_of(n));
    let wpr = words_per_row(n, bits);
    let rows = codes.len() / n;
    let mut out = vec![0u32; rows * wpr];
    for (row, words) in codes.chunks_exact(n).zip(out.chunks_exact_mut(wpr)) {
        for (i, &c) in row.iter().enumerate() {
            debug_assert!((c as u32) < (1 << bits));
            let bit = i * bits as usize;
            let (w, o) = (bit / 32, bit % 32);
            words[w] |= (c as u32) << o;
            if o + bits as usize > 32 {
                words[w + 1] |= (c as u32) >> (32 - o);
            }
        }
    }
    out
}

/// Unpacks `rows × n` codes.
pub fn unpack(words: &[u32], rows: usize, n: usize, bits: u8) -> Vec<u8> {
    let wpr = words_per_row(n, bits);
    assert_eq!(
        words.len(),
        rows * wpr,
        "packed size does not match {rows}×{n} at {bits} bits"
    );
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * n);
    for ws in words.chunks_exact(wpr) {
        for i in 0..n {
            let bit = i * bits as usize;
            let (w, o) = (bit / 32, bit % 32);
            let mut v = ws[w] >> o;
            if o + bits as usize > 32 {
                v |= ws[w + 1] << (32 - o);
            }
            out.push((v & mask) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width_and_ragged_shapes() {
        let mut seed = 1u64;
        for bits in 2..=8u8 {
            for n in [1usize, 3, 7, 8, 31, 32, 33, 100, 576] {
                for rows in [1usize, 2, 5] {
                    let codes: Vec<u8> = (0..rows * n)
                        .map(|_| {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                            ((seed >> 33) % (1 << bits)) as u8
                        })
                        .collect();
                    let w = pack(&codes, n, bits);
                    assert_eq!(w.len(), rows * words_per_row(n, bits));
                    assert_eq!(
                        unpack(&w, rows, n, bits),
                        codes,
                        "bits {bits} n {n} rows {rows}"
                    );
                }
            }
        }
    }

    #[test]
    fn four_bit_layout_matches_compressed_tensors() {
        // Word k holds elements 8k..8k+7, element 8k in bits 0..3.
        let codes: Vec<u8> = (0..8).collect();
        assert_eq!(pack(&codes, 8, 4), vec![0x7654_3210]);
    }
}
