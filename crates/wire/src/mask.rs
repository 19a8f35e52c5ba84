//! Payload masking (RFC 6455 section 5.3), a word at a time.
//!
//! The loops work on 64- and 8-byte chunks of plain integers so the compiler turns them
//! into vector instructions; on x86-64 CPUs with AVX2 (checked at run time) the same
//! loop is compiled for 32-byte registers.

/// XORs `buf` with the masking key, starting at the key's first byte.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    if buf.len() < 64 {
        // Small payloads (most messages): the word loop, inline, with no set-up.
        mask_blocks(buf, key);
    } else {
        apply_mask_at(buf, key, 0)
    }
}

/// XORs `buf` with the masking key, where `buf` starts `offset` bytes into the payload
/// (so a payload can be unmasked piece by piece as it arrives).
pub fn apply_mask_at(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotated(key, offset);
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= 128 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above; std caches the answer), the only
        // requirement of calling a function compiled for it. The function itself is
        // the same safe code as below.
        #[allow(unsafe_code)]
        unsafe {
            mask_avx2(buf, key)
        };
        return;
    }
    mask_blocks(buf, key);
}

/// The key as it applies from `offset` bytes into the payload.
#[inline(always)]
fn rotated(key: [u8; 4], offset: usize) -> [u8; 4] {
    [
        key[offset % 4],
        key[(offset + 1) % 4],
        key[(offset + 2) % 4],
        key[(offset + 3) % 4],
    ]
}

/// [`mask_blocks`] compiled for AVX2: the same loop, 32 bytes per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn mask_avx2(buf: &mut [u8], key: [u8; 4]) {
    mask_blocks(buf, key);
}

/// Masks `buf` from key byte 0 on: 64-byte blocks XORed with a 64-byte key pattern
/// (fixed sizes the compiler turns into vector instructions, with no per-lane
/// conversions or checks), then 8-byte words, then bytes.
#[inline(always)]
fn mask_blocks(buf: &mut [u8], key: [u8; 4]) {
    mask_blocks_seeing::<false>(buf, key);
}

/// [`mask_blocks`], and with `SEE` the OR of every byte it wrote (its top bit is set
/// when the result is not ASCII), in the same pass; without, no extra work.
#[inline(always)]
fn mask_blocks_seeing<const SEE: bool>(buf: &mut [u8], key: [u8; 4]) -> u8 {
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut seen_blocks = [0u8; 64];
    let mut seen_words = 0u64;
    let mut seen_bytes = 0u8;
    let mut rest = buf;
    if rest.len() >= 64 {
        // The key pattern is made only for a payload that has a block of it: a small
        // message (most of them) goes straight to the words below.
        let mut pattern = [0u8; 256];
        for quad in pattern.chunks_exact_mut(4) {
            quad.copy_from_slice(&key);
        }
        // 256-byte blocks while they last (four 64-byte ones per turn of the loop, so
        // the loop's own count and branch are paid once for them), then 64-byte ones.
        let mut seen_wide = [0u8; 256];
        rest = mask_chunks::<SEE, 256>(rest, &pattern, &mut seen_wide);
        let short: &[u8; 64] = pattern[..64].try_into().expect("64 bytes");
        rest = mask_chunks::<SEE, 64>(rest, short, &mut seen_blocks);
        if SEE {
            for quarter in seen_wide.chunks_exact(64) {
                for (all, seen) in seen_blocks.iter_mut().zip(quarter) {
                    *all |= seen;
                }
            }
        }
    }
    let mut narrow = rest.chunks_exact_mut(8);
    for lane in &mut narrow {
        let value = u64::from_ne_bytes(lane.try_into().expect("8-byte lane")) ^ word;
        lane.copy_from_slice(&value.to_ne_bytes());
        if SEE {
            seen_words |= value;
        }
    }
    // Every chunk above is a multiple of 4 long, so the tail starts at key byte 0.
    let tail = narrow.into_remainder();
    let last = if tail.len() >= 4 {
        let (four, last) = tail.split_at_mut(4);
        let value =
            u32::from_ne_bytes((&*four).try_into().expect("4 bytes")) ^ u32::from_ne_bytes(key);
        four.copy_from_slice(&value.to_ne_bytes());
        if SEE {
            seen_words |= u64::from(value);
        }
        last
    } else {
        tail
    };
    for (i, byte) in last.iter_mut().enumerate() {
        *byte ^= key[i & 3];
        if SEE {
            seen_bytes |= *byte;
        }
    }
    if !SEE {
        return 0;
    }
    let blocks = seen_blocks.iter().fold(0u8, |all, b| all | b);
    let words = seen_words.to_ne_bytes().iter().fold(0u8, |all, b| all | b);
    blocks | words | seen_bytes
}

/// XORs each whole `N`-byte chunk of `buf` with `pattern`, ORing what it wrote into
/// `seen` with `SEE`; returns the rest (shorter than `N`).
#[inline(always)]
fn mask_chunks<'a, const SEE: bool, const N: usize>(
    buf: &'a mut [u8],
    pattern: &[u8; N],
    seen: &mut [u8; N],
) -> &'a mut [u8] {
    let mut chunks = buf.chunks_exact_mut(N);
    for chunk in &mut chunks {
        for ((byte, mask), seen) in chunk.iter_mut().zip(pattern.iter()).zip(seen.iter_mut()) {
            *byte ^= mask;
            if SEE {
                *seen |= *byte;
            }
        }
    }
    chunks.into_remainder()
}

/// Unmasks a whole payload (from key byte 0) and says whether the result is ASCII, in
/// one pass: text that is (most JSON, most chat) then needs no UTF-8 validation.
#[inline]
pub fn unmask_ascii(buf: &mut [u8], key: [u8; 4]) -> bool {
    unmask_ascii_at(buf, key, 0)
}

/// [`unmask_ascii`] for a piece that starts `offset` bytes into the payload.
#[inline]
pub fn unmask_ascii_at(buf: &mut [u8], key: [u8; 4], offset: usize) -> bool {
    let key = rotated(key, offset);
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= 128 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: as in `apply_mask_at`: the CPU has AVX2, checked just above.
        #[allow(unsafe_code)]
        return unsafe { unmask_ascii_avx2(buf, key) };
    }
    mask_blocks_seeing::<true>(buf, key) & 0x80 == 0
}

/// [`unmask_ascii`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn unmask_ascii_avx2(buf: &mut [u8], key: [u8; 4]) -> bool {
    mask_blocks_seeing::<true>(buf, key) & 0x80 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(i + offset) % 4];
        }
    }

    #[test]
    fn matches_the_byte_loop_for_every_length_and_offset() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in (0..300).chain([1000, 4099]) {
            for offset in 0..4 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut fast = data.clone();
                let mut slow = data.clone();
                apply_mask_at(&mut fast, key, offset);
                naive(&mut slow, key, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn unmasking_sees_whether_the_text_is_ascii() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in (0..300usize).chain([1000, 4099]) {
            let ascii: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for offset in 0..4 {
                let mut masked = ascii.clone();
                naive(&mut masked, key, offset);
                assert!(unmask_ascii_at(&mut masked, key, offset), "len {len}");
                assert_eq!(masked, ascii);
            }
            for at in [0, len / 2, len.saturating_sub(1)]
                .into_iter()
                .filter(|_| len > 0)
            {
                let mut text = ascii.clone();
                text[at] = 0xC3;
                let mut masked = text.clone();
                naive(&mut masked, key, 0);
                assert!(!unmask_ascii(&mut masked, key), "len {len}, 0xC3 at {at}");
                assert_eq!(masked, text);
            }
        }
    }

    #[test]
    fn piecewise_equals_whole() {
        let key = [9, 8, 7, 6];
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key);
        let mut pieces = data.clone();
        let mut at = 0;
        for step in [1, 3, 5, 64, 2, 300, 625] {
            apply_mask_at(&mut pieces[at..at + step], key, at);
            at += step;
        }
        assert_eq!(at, 1000);
        assert_eq!(whole, pieces);
    }
}
