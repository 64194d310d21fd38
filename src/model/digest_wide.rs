//! BLAKE3 of many 4 KiB inputs at once: the digests of a pass's gradient
//! chunks (`roles::audit::GRAD_CHUNK` floats each), which every miner
//! takes of every pass and a validator of every probed chunk of every
//! pass it checks.
//!
//! The `blake3` crate hashes one input at a time, and a 4 KiB input is
//! four BLAKE3 chunks: it hashes them four lanes wide, a quarter of what
//! AVX-512 holds, at about half its speed on large inputs (2.95 GB/s
//! against 5.6-6.4 on one 256 KiB input, one core of the AMD EPYC VM).
//! Here sixteen chunks, of four inputs, go through one compression
//! together, each lane holding one chunk (the same arithmetic, lane by
//! lane, that the crate does), so the digests are the crate's bit for bit
//! (`digests_are_blake3s` checks): 4.55 GB/s on the same inputs.
//! Elsewhere (no AVX-512, or not x86-64) the crate hashes them.

// Only the AVX-512 build uses the constants and the lane helpers.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

/// Bytes of the inputs hashed wide; other lengths go to `blake3::hash`.
pub const WIDE_INPUT: usize = 4096;

const LANES: usize = 16;
const CHUNK_LEN: usize = 1024;
const BLOCK_LEN: usize = 64;
/// BLAKE3 chunks a wide input is.
const CHUNKS: usize = WIDE_INPUT / CHUNK_LEN;
/// Inputs whose chunks fill the lanes.
const INPUTS: usize = LANES / CHUNKS;

const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const PARENT: u32 = 4;
const ROOT: u32 = 8;

/// The message words each round reads, in order: the identity, then each
/// round the one before permuted.
const SCHEDULE: [[usize; 16]; 7] = {
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    let mut schedule = [[0; 16]; 7];
    let mut i = 0;
    while i < 16 {
        schedule[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            schedule[r][i] = schedule[r - 1][PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    schedule
};

/// One 32-bit word of each lane.
type Lanes = [u32; LANES];

/// The BLAKE3 digest of each input: those of [`WIDE_INPUT`] bytes hashed
/// sixteen chunks at a time where the CPU has AVX-512, the rest (and all
/// of them elsewhere) by `blake3::hash`.
pub fn digests(inputs: &[&[u8]]) -> Vec<blake3::Hash> {
    let mut out: Vec<Option<blake3::Hash>> = vec![None; inputs.len()];
    let wide: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].len() == WIDE_INPUT)
        .collect();
    for group in wide.chunks(INPUTS) {
        let group_inputs: Vec<&[u8]> = group.iter().map(|&i| inputs[i]).collect();
        let Some(hashed) = hash_group(&group_inputs) else {
            break;
        };
        for (&i, hash) in group.iter().zip(hashed) {
            out[i] = Some(hash);
        }
    }
    out.into_iter()
        .zip(inputs)
        .map(|(hash, input)| hash.unwrap_or_else(|| blake3::hash(input)))
        .collect()
}

/// Up to [`INPUTS`] inputs of [`WIDE_INPUT`] bytes hashed together, or
/// `None` where the CPU has no AVX-512 to do it in.
#[allow(unused_variables)]
fn hash_group(inputs: &[&[u8]]) -> Option<Vec<blake3::Hash>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features it was compiled for.
        return Some(unsafe { avx512::group(inputs) });
    }
    None
}

/// The blocks of parent nodes: lane `l` holds the chaining values of
/// lanes `2l` (left) and `2l + 1` (right) of `cvs`; the upper half of the
/// lanes holds zeros and gives nothing of use.
fn parent_blocks(cvs: &[Lanes; 8]) -> [Lanes; 16] {
    let mut m = [[0u32; LANES]; 16];
    for l in 0..LANES / 2 {
        for w in 0..8 {
            m[w][l] = cvs[w][2 * l];
            m[w + 8][l] = cvs[w][2 * l + 1];
        }
    }
    m
}

/// The digests in the first `n` lanes of `roots`.
fn root_hashes(roots: &[Lanes; 8], n: usize) -> Vec<blake3::Hash> {
    (0..n)
        .map(|i| {
            let mut bytes = [0u8; 32];
            for (w, out) in bytes.chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&roots[w][i].to_le_bytes());
            }
            blake3::Hash::from_bytes(bytes)
        })
        .collect()
}

const IV_LANES: [Lanes; 8] = {
    let mut lanes = [[0; LANES]; 8];
    let mut w = 0;
    while w < 8 {
        lanes[w] = [IV[w]; LANES];
        w += 1;
    }
    lanes
};

/// The compression in AVX-512 registers, one vector a state word, and
/// each block's sixteen rows (one a lane) transposed into words there:
/// the same arithmetic on arrays, vectorized by the compiler, went
/// through memory at every step and ran at 0.6x the crate's four lanes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{
        parent_blocks, root_hashes, Lanes, BLOCK_LEN, CHUNKS, CHUNK_END, CHUNK_LEN, CHUNK_START,
        IV, IV_LANES, LANES, PARENT, ROOT, SCHEDULE, WIDE_INPUT,
    };

    /// Lane `l` hashes chunk `l % 4` of input `l / 4` (lanes past the
    /// inputs hash zeros, of no use); then the two parents of each
    /// input's chunks, and its root.
    #[target_feature(enable = "avx512f")]
    pub(super) fn group(inputs: &[&[u8]]) -> Vec<blake3::Hash> {
        let rows: Vec<&[u8]> = inputs
            .iter()
            .flat_map(|input| input.chunks_exact(CHUNK_LEN))
            .take(LANES)
            .collect();
        debug_assert!(inputs.iter().all(|i| i.len() == WIDE_INPUT));
        let counter: Lanes = std::array::from_fn(|l| (l % CHUNKS) as u32);
        let mut cv: [__m512i; 8] = std::array::from_fn(|w| load(&IV_LANES[w]));
        for block in 0..CHUNK_LEN / BLOCK_LEN {
            let m = transpose(std::array::from_fn(|l| match rows.get(l) {
                Some(row) => load_bytes(&row[block * BLOCK_LEN..(block + 1) * BLOCK_LEN]),
                None => _mm512_setzero_si512(),
            }));
            let flags = match block {
                0 => CHUNK_START,
                b if b + 1 == CHUNK_LEN / BLOCK_LEN => CHUNK_END,
                _ => 0,
            };
            cv = compress(&cv, &m, load(&counter), flags);
        }
        let parents = compress_lanes(&cv.map(|v| store(v)), PARENT);
        let roots = compress_lanes(&parents, PARENT | ROOT);
        root_hashes(&roots, inputs.len())
    }

    /// The parents of `cvs`' lanes in pairs (see [`parent_blocks`]).
    #[target_feature(enable = "avx512f")]
    fn compress_lanes(cvs: &[Lanes; 8], flags: u32) -> [Lanes; 8] {
        let m = parent_blocks(cvs).map(|w| load(&w));
        let iv = IV_LANES.map(|w| load(&w));
        compress(&iv, &m, _mm512_setzero_si512(), flags).map(|v| store(v))
    }

    #[target_feature(enable = "avx512f")]
    fn load(x: &Lanes) -> __m512i {
        // SAFETY: `x` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(x.as_ptr().cast()) }
    }

    /// 64 bytes, as 16 little-endian words.
    #[target_feature(enable = "avx512f")]
    fn load_bytes(bytes: &[u8]) -> __m512i {
        let bytes: &[u8; BLOCK_LEN] = bytes.try_into().unwrap_or(&[0; BLOCK_LEN]);
        // SAFETY: `bytes` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    fn store(v: __m512i) -> Lanes {
        let mut x = [0u32; LANES];
        // SAFETY: `x` is 64 writable bytes; the store is unaligned.
        unsafe { _mm512_storeu_si512(x.as_mut_ptr().cast(), v) };
        x
    }

    /// Rows (one a lane, 16 words each) into words (one a vector, 16
    /// lanes each): pairs of rows interleaved by 32 bits, then pairs of
    /// those by 64, then 128-bit quarters picked in two rounds.
    #[target_feature(enable = "avx512f")]
    fn transpose(rows: [__m512i; 16]) -> [__m512i; 16] {
        let lo32: [__m512i; 8] =
            std::array::from_fn(|k| _mm512_unpacklo_epi32(rows[2 * k], rows[2 * k + 1]));
        let hi32: [__m512i; 8] =
            std::array::from_fn(|k| _mm512_unpackhi_epi32(rows[2 * k], rows[2 * k + 1]));
        // Quarter q of fours[k][i] holds word 4q + i of rows 4k .. 4k + 4.
        let fours: [[__m512i; 4]; 4] = std::array::from_fn(|k| {
            let (a, b) = (2 * k, 2 * k + 1);
            [
                _mm512_unpacklo_epi64(lo32[a], lo32[b]),
                _mm512_unpackhi_epi64(lo32[a], lo32[b]),
                _mm512_unpacklo_epi64(hi32[a], hi32[b]),
                _mm512_unpackhi_epi64(hi32[a], hi32[b]),
            ]
        });
        // eights[h][i], i < 4: words i, 8 + i of rows 8h .. 8h + 8 by
        // quarters; i >= 4: words i, 8 + i likewise.
        let eights: [[__m512i; 8]; 2] = std::array::from_fn(|h| {
            let (a, b) = (fours[2 * h], fours[2 * h + 1]);
            std::array::from_fn(|i| match i {
                0..4 => _mm512_shuffle_i32x4::<0x88>(a[i], b[i]),
                _ => _mm512_shuffle_i32x4::<0xdd>(a[i - 4], b[i - 4]),
            })
        });
        std::array::from_fn(|w| match w {
            0..8 => _mm512_shuffle_i32x4::<0x88>(eights[0][w], eights[1][w]),
            _ => _mm512_shuffle_i32x4::<0xdd>(eights[0][w - 8], eights[1][w - 8]),
        })
    }

    /// BLAKE3's quarter-round on state words `a, b, c, d` of every lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn g(s: &mut [__m512i; 16], [a, b, c, d]: [usize; 4], x: __m512i, y: __m512i) {
        s[a] = _mm512_add_epi32(_mm512_add_epi32(s[a], s[b]), x);
        s[d] = _mm512_ror_epi32::<16>(_mm512_xor_si512(s[d], s[a]));
        s[c] = _mm512_add_epi32(s[c], s[d]);
        s[b] = _mm512_ror_epi32::<12>(_mm512_xor_si512(s[b], s[c]));
        s[a] = _mm512_add_epi32(_mm512_add_epi32(s[a], s[b]), y);
        s[d] = _mm512_ror_epi32::<8>(_mm512_xor_si512(s[d], s[a]));
        s[c] = _mm512_add_epi32(s[c], s[d]);
        s[b] = _mm512_ror_epi32::<7>(_mm512_xor_si512(s[b], s[c]));
    }

    /// BLAKE3's compression of one 64-byte block in every lane, returning
    /// the chaining values (the first eight words of the output).
    #[target_feature(enable = "avx512f")]
    fn compress(
        cv: &[__m512i; 8],
        m: &[__m512i; 16],
        counter: __m512i,
        flags: u32,
    ) -> [__m512i; 8] {
        let word = |w: u32| _mm512_set1_epi32(w as i32);
        let mut s = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            word(IV[0]),
            word(IV[1]),
            word(IV[2]),
            word(IV[3]),
            counter,
            word(0),
            word(BLOCK_LEN as u32),
            word(flags),
        ];
        for words in &SCHEDULE {
            g(&mut s, [0, 4, 8, 12], m[words[0]], m[words[1]]);
            g(&mut s, [1, 5, 9, 13], m[words[2]], m[words[3]]);
            g(&mut s, [2, 6, 10, 14], m[words[4]], m[words[5]]);
            g(&mut s, [3, 7, 11, 15], m[words[6]], m[words[7]]);
            g(&mut s, [0, 5, 10, 15], m[words[8]], m[words[9]]);
            g(&mut s, [1, 6, 11, 12], m[words[10]], m[words[11]]);
            g(&mut s, [2, 7, 8, 13], m[words[12]], m[words[13]]);
            g(&mut s, [3, 4, 9, 14], m[words[14]], m[words[15]]);
        }
        std::array::from_fn(|w| _mm512_xor_si512(s[w], s[w + 8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_blake3s() {
        let mut rng = crate::data::rng::SplitMix64::new(3, 0);
        let bytes: Vec<u8> = (0..11 * WIDE_INPUT + 100)
            .map(|_| rng.next_u64() as u8)
            .collect();
        // Groups of four, a group of three, inputs of other lengths
        // between them, and one empty.
        let mut inputs: Vec<&[u8]> = bytes.chunks(WIDE_INPUT).collect();
        inputs.insert(3, &bytes[5..77]);
        inputs.insert(0, &[]);
        inputs.push(&bytes[1..WIDE_INPUT + 1]);
        let wide = inputs.iter().filter(|i| i.len() == WIDE_INPUT).count();
        assert_eq!(wide, 12);
        let expected: Vec<blake3::Hash> = inputs.iter().map(|i| blake3::hash(i)).collect();
        assert_eq!(digests(&inputs), expected);
        for n in 1..=5 {
            assert_eq!(digests(&inputs[1..1 + n]), expected[1..1 + n], "{n} inputs");
        }
    }
}
