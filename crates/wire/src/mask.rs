//! Payload masking (RFC 6455 section 5.3), a word at a time.
//!
//! The loops work on 64- and 8-byte chunks of plain integers so the compiler turns them
//! into vector instructions; on x86-64 CPUs with AVX2 (checked at run time) the same
//! loop is compiled for 32-byte registers.

/// XORs `buf` with the masking key, starting at the key's first byte.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    apply_mask_at(buf, key, 0)
}

/// XORs `buf` with the masking key, where `buf` starts `offset` bytes into the payload
/// (so a payload can be unmasked piece by piece as it arrives).
pub fn apply_mask_at(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = [
        key[offset % 4],
        key[(offset + 1) % 4],
        key[(offset + 2) % 4],
        key[(offset + 3) % 4],
    ];
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
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut pattern = [0u8; 64];
    for (i, byte) in pattern.iter_mut().enumerate() {
        *byte = key[i & 3];
    }
    let mut wide = buf.chunks_exact_mut(64);
    for chunk in &mut wide {
        for (byte, mask) in chunk.iter_mut().zip(pattern.iter()) {
            *byte ^= mask;
        }
    }
    let mut narrow = wide.into_remainder().chunks_exact_mut(8);
    for lane in &mut narrow {
        let value = u64::from_ne_bytes(lane.try_into().expect("8-byte lane")) ^ word;
        lane.copy_from_slice(&value.to_ne_bytes());
    }
    // Every chunk above is a multiple of 4 long, so the tail starts at key byte 0.
    for (i, byte) in narrow.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
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
