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

/// `VipInfo::hash`: the whole 5-tuple: each connection placed on its own.
pub const HASH_FLOW: u32 = 0;
/// `VipInfo::hash`: the client's address alone (cut to the VIP's prefix): a client
/// keeps its backend across connections and balancers (source hashing, `sh`).
pub const HASH_SOURCE: u32 = 1;
/// `VipInfo::hash`: the destination port alone.
pub const HASH_DESTINATION_PORT: u32 = 2;

/// The bits of an address word (network order) that a prefix of `prefix` bits keeps;
/// the word holds bits `first..first + 32` of the address.
#[inline(always)]
pub const fn masked(word: u32, prefix: u32, first: u32) -> u32 {
    if prefix >= first + 32 {
        word
    } else if prefix <= first {
        0
    } else {
        word & (u32::MAX << (32 - (prefix - first))).to_be()
    }
}

/// A VIP's hash of an IPv4 flow over the fields it chose (`fields`, `prefix`: its
/// `VipInfo::hash` and `hash_prefix_v4`).
#[inline(always)]
pub const fn vip_hash_v4(
    fields: u32,
    prefix: u8,
    (src, dst, sport, dport, proto): (u32, u32, u16, u16, u8),
) -> u32 {
    match fields {
        HASH_SOURCE => flow_hash_v4(masked(src, prefix as u32, 0), 0, 0, 0, 0),
        HASH_DESTINATION_PORT => flow_hash_v4(0, 0, 0, dport, 0),
        _ => flow_hash_v4(src, dst, sport, dport, proto),
    }
}

/// The same for IPv6 (`prefix`: `hash_prefix_v6`).
#[inline(always)]
pub const fn vip_hash_v6(
    fields: u32,
    prefix: u8,
    (src, dst, sport, dport, proto): ([u32; 4], [u32; 4], u16, u16, u8),
) -> u32 {
    match fields {
        HASH_SOURCE => {
            let p = prefix as u32;
            let src = [
                masked(src[0], p, 0),
                masked(src[1], p, 32),
                masked(src[2], p, 64),
                masked(src[3], p, 96),
            ];
            flow_hash_v6(src, [0; 4], 0, 0, 0)
        }
        HASH_DESTINATION_PORT => flow_hash_v6([0; 4], [0; 4], 0, dport, 0),
        _ => flow_hash_v6(src, dst, sport, dport, proto),
    }
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
    fn source_hash_keeps_to_the_prefix() {
        let a = (0x0a00_0001u32.to_be(), 0x0a00_0064u32.to_be(), 1000, 80, 6);
        let other_port = (a.0, a.1, 2000, 80, 6);
        let same_24 = (0x0a00_00feu32.to_be(), a.1, 1000, 80, 6);
        let other_24 = (0x0a00_0101u32.to_be(), a.1, 1000, 80, 6);
        assert_eq!(
            vip_hash_v4(HASH_SOURCE, 32, a),
            vip_hash_v4(HASH_SOURCE, 32, other_port)
        );
        assert_ne!(
            vip_hash_v4(HASH_SOURCE, 32, a),
            vip_hash_v4(HASH_SOURCE, 32, same_24)
        );
        assert_eq!(
            vip_hash_v4(HASH_SOURCE, 24, a),
            vip_hash_v4(HASH_SOURCE, 24, same_24)
        );
        assert_ne!(
            vip_hash_v4(HASH_SOURCE, 24, a),
            vip_hash_v4(HASH_SOURCE, 24, other_24)
        );
        assert_ne!(
            vip_hash_v4(HASH_FLOW, 32, a),
            vip_hash_v4(HASH_FLOW, 32, other_port)
        );
        assert_eq!(
            vip_hash_v4(HASH_FLOW, 0, a),
            flow_hash_v4(a.0, a.1, a.2, a.3, a.4)
        );
        let v6 = ([1, 2, 3, 4], [5, 6, 7, 8], 9, 10, 6);
        let v6_same_64 = ([1, 2, 30, 40], [5, 6, 7, 8], 11, 10, 6);
        assert_eq!(
            vip_hash_v6(HASH_SOURCE, 64, v6),
            vip_hash_v6(HASH_SOURCE, 64, v6_same_64)
        );
        assert_ne!(
            vip_hash_v6(HASH_SOURCE, 128, v6),
            vip_hash_v6(HASH_SOURCE, 128, v6_same_64)
        );
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
