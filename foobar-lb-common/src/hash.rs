//! The flow hash: which Maglev slot a flow falls in.
//!
//! Computed by the kernel for each new flow and by the agent's simulator, so both must
//! agree bit for bit; any balancer with the same table then picks the same backend.
//! It is MurmurHash3's 32-bit mixing over the 5-tuple words, with a fixed seed.

/// Seed of the flow hash. Changing it moves every flow: all balancers of one VIP
/// must use the same value.
pub const FLOW_HASH_SEED: u32 = 0x6662_6c62; // "fblb"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 flow. Addresses and ports are the raw network-order values as
/// read from the packet (`from_ne_bytes`), so the kernel hashes what it reads.
#[inline(always)]
pub const fn flow_hash_v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix(h, src);
    h = mix(h, dst);
    h = mix(h, (sport as u32) << 16 | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 16)
}

/// Hash of an IPv6 flow, addresses as four network-order words each.
#[inline(always)]
pub const fn flow_hash_v6(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, src[i]);
        i += 1;
    }
    let mut i = 0;
    while i < 4 {
        h = mix(h, dst[i]);
        i += 1;
    }
    h = mix(h, (sport as u32) << 16 | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 40)
}

/// Hash of a 32-bit word with a seed: the agent uses it for Maglev permutations.
pub const fn hash32(seed: u32, word: u32) -> u32 {
    finish(mix(seed, word), 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_on_every_field() {
        let base = flow_hash_v4(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash_v4(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 4, 17));
        assert_eq!(base, flow_hash_v4(1, 2, 3, 4, 6));
    }

    #[test]
    fn v6_depends_on_every_word() {
        let base = flow_hash_v6([1, 2, 3, 4], [5, 6, 7, 8], 9, 10, 6);
        for i in 0..4 {
            let mut a = [1, 2, 3, 4];
            a[i] ^= 0x100;
            assert_ne!(base, flow_hash_v6(a, [5, 6, 7, 8], 9, 10, 6));
            let mut b = [5, 6, 7, 8];
            b[i] ^= 0x100;
            assert_ne!(base, flow_hash_v6([1, 2, 3, 4], b, 9, 10, 6));
        }
        assert_ne!(base, flow_hash_v6([1, 2, 3, 4], [5, 6, 7, 8], 9, 11, 6));
    }

    #[test]
    fn spreads_consecutive_ports_evenly() {
        // 65,536 source ports into 16 buckets: each near 4,096.
        let mut buckets = [0u32; 16];
        for port in 0..=u16::MAX {
            buckets[(flow_hash_v4(0x0a00_0001, 0x0a00_0064, port, 80, 6) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((3_900..4_300).contains(&b), "{buckets:?}");
        }
    }
}
