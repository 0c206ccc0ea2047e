//! Incremental Internet checksum updates (RFC 1624), for rewriting a header field
//! without summing the whole packet again.
//!
//! Values are the raw bytes of the fields read as native integers
//! (`from_ne_bytes`): one's-complement sums do not depend on byte order as long as
//! the checksum and the fields are read the same way (RFC 1071, section 2.B).

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after a 16-bit field changed from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// New checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = !check as u32 + (!old >> 16) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// New checksum after a 128-bit field (an IPv6 address, four words) changed.
#[inline(always)]
pub const fn replace16(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 4 {
        sum = fold(sum) as u32;
        sum += (!old[i] >> 16) + (!old[i] & 0xffff) + (new[i] >> 16) + (new[i] & 0xffff);
        i += 1;
    }
    !fold(sum)
}

/// [`replace16`] for UDP (0 stays "no checksum", a computed 0 becomes 0xffff).
#[inline(always)]
pub const fn udp_replace16(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The one's-complement sum of 16-bit words, unfolded (add more, then `!fold`).
#[inline(always)]
pub const fn sum_words(words: &[u16]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        sum += words[i] as u32;
        i += 1;
    }
    sum
}

/// The same for UDP, where 0 means "no checksum": it stays 0, and a computed 0 is
/// sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace4(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// [`udp_replace4`] for a 16-bit field.
#[inline(always)]
pub const fn udp_replace2(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace2(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum of 16-bit words, the reference the incremental form must match.
    fn full(words: &[u16]) -> u16 {
        !fold(words.iter().map(|&w| w as u32).sum())
    }

    #[test]
    fn replace2_matches_a_full_recompute() {
        let mut words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let check = full(&words);
        for new in [0u16, 1, 0xffff, 0x1234, 0xfffe] {
            let old = words[3];
            words[3] = new;
            assert_eq!(replace2(check, old, new), full(&words), "new {new:#x}");
            words[3] = old;
        }
    }

    #[test]
    fn replace4_matches_a_full_recompute() {
        let words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let check = full(&words);
        for new in [0u32, 0xffff_ffff, 0x0a00_0001, 0x7f00_0001, 0xc0a8_00c7] {
            let mut changed = words;
            changed[8] = (new >> 16) as u16;
            changed[9] = new as u16;
            let old = (words[8] as u32) << 16 | words[9] as u32;
            let got = replace4(check, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            let want = full(&changed);
            assert!(
                got == want || (got ^ want) == 0xffff && (got == 0 || want == 0),
                "{new:#x}: {got:#x} vs {want:#x}"
            );
        }
    }

    #[test]
    fn replace16_matches_a_full_recompute() {
        let mut words = [0u16; 12];
        for (i, w) in words.iter_mut().enumerate() {
            *w = 0x1111u16.wrapping_mul(i as u16 + 3) ^ 0xa5a5;
        }
        let check = full(&words);
        let word = |w: &[u16; 12], i: usize| (w[2 + 2 * i] as u32) << 16 | w[3 + 2 * i] as u32;
        let old = [0, 1, 2, 3].map(|i| word(&words, i));
        for new in [
            [0u32; 4],
            [u32::MAX; 4],
            [0x2001_0db8, 0, 0, 1],
            [7, 0xffff, 0x10000, 9],
        ] {
            let mut changed = words;
            for i in 0..4 {
                changed[2 + 2 * i] = (new[i] >> 16) as u16;
                changed[3 + 2 * i] = new[i] as u16;
            }
            let got = replace16(check, old, new);
            let want = full(&changed);
            assert!(
                got == want || (got ^ want) == 0xffff && (got == 0 || want == 0),
                "{new:x?}: {got:#x} vs {want:#x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_zero_result_becomes_ffff() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
        // ~0xffff + ~0 + 0 folds to 0xffff, so the plain update gives 0 ...
        assert_eq!(replace2(0xffff, 0, 0), 0);
        // ... which UDP must send as 0xffff, 0 meaning "no checksum".
        assert_eq!(udp_replace2(0xffff, 0, 0), 0xffff);
        assert_eq!(udp_replace4(0xffff, 0, 0), 0xffff);
    }
}
