//! New-flow schedules, computed here so the kernel only indexes an array.
//!
//! Both schedulers produce a list of backend positions; the data plane picks slot
//! `hash % len` (Maglev) or `cursor++ % len` (round robin). Inputs are sorted by
//! endpoint first, so a schedule depends only on the backend set and the weights,
//! never on the order in which backends were added.

use foobar_lb_common::{Endpoint, SCHEDULE_STRIDE, hash::hash32};

/// Default Maglev table size: prime, as the permutation requires.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;

/// A backend as the schedulers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted {
    /// Identity of the backend: what its place in a Maglev table hashes.
    pub endpoint: Endpoint,
    /// Relative share of new flows; 0 takes none (drained).
    pub weight: u32,
}

/// Why a schedule cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// The table size is not a prime in range.
    #[error("maglev table size {0} must be a prime between 3 and {max}", max = SCHEDULE_STRIDE)]
    BadTableSize(u32),
    /// More weighted backends than table slots.
    #[error("maglev table size {size} is too small for {backends} backends")]
    TableTooSmall {
        /// Table size asked for.
        size: u32,
        /// Backends with a weight.
        backends: usize,
    },
    /// The weights reduced by their gcd still sum beyond the ring capacity.
    #[error("round-robin ring of {len} slots (sum of weights / their gcd) exceeds {max}", max = SCHEDULE_STRIDE)]
    RingTooLong {
        /// Ring length the weights need.
        len: u64,
    },
}

/// Positions (into `backends`) sorted by endpoint, weightless ones left out.
fn canonical_order(backends: &[Weighted]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    order.sort_by_key(|&i| backends[i].endpoint);
    order
}

/// True if `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn endpoint_hash(seed: u32, ep: &Endpoint) -> u32 {
    let tail = (ep.port as u32) << 16 | (ep.proto as u32) << 8 | ep.family as u32;
    ep.addr
        .iter()
        .chain(Some(&tail))
        .fold(seed, |h, &w| hash32(h, w))
}

/// The weighted Maglev lookup table of `size` slots: each slot holds a position in
/// `backends`. Empty when no backend has a weight.
///
/// Each backend walks its own permutation of the slots (offset and skip from the hash
/// of its endpoint) and takes the next free one on each of its turns. Turns come in
/// passes: in pass `p` a backend of weight `w` gets `floor(p·w/max) − floor((p−1)·w/max)`
/// turns, so the shares follow the weights and equal weights reduce to plain Maglev.
pub fn maglev(backends: &[Weighted], size: u32) -> Result<Vec<u32>, ScheduleError> {
    if !(3..=SCHEDULE_STRIDE).contains(&size) || !is_prime(size) {
        return Err(ScheduleError::BadTableSize(size));
    }
    let order = canonical_order(backends);
    if order.is_empty() {
        return Ok(Vec::new());
    }
    if order.len() >= size as usize {
        return Err(ScheduleError::TableTooSmall {
            size,
            backends: order.len(),
        });
    }
    let m = size as u64;
    let walks: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let ep = &backends[i].endpoint;
            let offset = endpoint_hash(0x6f66_6673, ep) as u64 % m;
            let skip = endpoint_hash(0x736b_6970, ep) as u64 % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = order
        .iter()
        .map(|&i| backends[i].weight as u64)
        .max()
        .unwrap_or(1);
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    for pass in 1u64.. {
        for (k, &i) in order.iter().enumerate() {
            let w = backends[i].weight as u64;
            let turns = pass * w / max_weight - (pass - 1) * w / max_weight;
            for _ in 0..turns {
                let (offset, skip) = walks[k];
                // A prime size makes every walk a permutation: a free slot is always found.
                loop {
                    let slot = ((offset + next[k] * skip) % m) as usize;
                    next[k] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == table.len() {
                    return Ok(table);
                }
            }
        }
    }
    unreachable!("the passes end when the table is full")
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weighted round-robin ring: positions in `backends`, one per new flow in turn.
///
/// Smooth weighted round robin (as nginx and HAProxy interleave): weights 3 and 1 give
/// `a a b a`, not `a a a b`. Weights are reduced by their gcd to keep the ring short.
pub fn round_robin(backends: &[Weighted]) -> Result<Vec<u32>, ScheduleError> {
    let order = canonical_order(backends);
    let g = order
        .iter()
        .fold(0u64, |g, &i| gcd(g, backends[i].weight as u64));
    if g == 0 {
        return Ok(Vec::new());
    }
    let weights: Vec<i64> = order
        .iter()
        .map(|&i| (backends[i].weight as u64 / g) as i64)
        .collect();
    let total: i64 = weights.iter().sum();
    if total as u64 > SCHEDULE_STRIDE as u64 {
        return Err(ScheduleError::RingTooLong { len: total as u64 });
    }
    let mut current = vec![0i64; weights.len()];
    let mut ring = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for k in 0..weights.len() {
            current[k] += weights[k];
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        ring.push(order[best] as u32);
    }
    Ok(ring)
}

/// Slots of a least-connections ring: the backends of the next new flows, planned
/// ahead from the connection counts and rewritten whenever they change.
pub const LEAST_CONNECTIONS_RING: usize = 256;

/// The least-connections ring: positions in `backends` for the next
/// [`LEAST_CONNECTIONS_RING`] new flows, given each backend's `active` connections.
///
/// Each pick goes to the backend that, with one more connection, would have the
/// fewest per unit of weight (`weighted`; otherwise every weight above 0 counts as 1),
/// as if every flow picked stayed open: exactly what the kernel choosing each flow
/// from live counts would do while no connection closes. Ties go to the first in
/// endpoint order. Empty when no backend has a weight.
pub fn least_connections(backends: &[Weighted], active: &[u64], weighted: bool) -> Vec<u32> {
    let order = canonical_order(backends);
    if order.is_empty() {
        return Vec::new();
    }
    let weight = |i: usize| {
        if weighted {
            backends[i].weight as u128
        } else {
            1
        }
    };
    let mut load: Vec<u128> = order.iter().map(|&i| active[i] as u128 + 1).collect();
    let mut ring = Vec::with_capacity(LEAST_CONNECTIONS_RING);
    for _ in 0..LEAST_CONNECTIONS_RING {
        // load[k] / weight(k) is smallest: compared crosswise, no division.
        let best = (1..order.len()).fold(0, |best, k| {
            if load[k] * weight(order[best]) < load[best] * weight(order[k]) {
                k
            } else {
                best
            }
        });
        ring.push(order[best] as u32);
        load[best] += 1;
    }
    ring
}

/// `ring` turned so that its first pick is at slot `cursor % len`, where the data
/// plane's shared cursor takes the next new flow's slot.
pub fn from_cursor(ring: &[u32], cursor: u32) -> Vec<u32> {
    let mut turned = ring.to_vec();
    if !ring.is_empty() {
        turned.rotate_right(cursor as usize % ring.len());
    }
    turned
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Instant};

    use foobar_lb_common::{FAMILY_IPV4, PROTO_TCP};

    use super::*;

    fn backend(i: u32, weight: u32) -> Weighted {
        Weighted {
            endpoint: Endpoint {
                addr: [
                    u32::from_be_bytes([10, 1, (i >> 8) as u8, i as u8]).to_be(),
                    0,
                    0,
                    0,
                ],
                port: 8080u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_IPV4,
            },
            weight,
        }
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for &b in table {
            *counts.entry(b).or_insert(0) += 1;
        }
        counts
    }

    /// Maps a table of positions to the endpoints they name, to compare tables of
    /// differently ordered inputs.
    fn by_endpoint(backends: &[Weighted], table: &[u32]) -> Vec<Endpoint> {
        table
            .iter()
            .map(|&i| backends[i as usize].endpoint)
            .collect()
    }

    #[test]
    fn maglev_fills_every_slot_within_two_percent_of_the_weighted_share() {
        for (n, weight_of) in [
            (2usize, (|_| 1) as fn(u32) -> u32),
            (10, |_| 1),
            (100, |_| 1),
            (7, |i| i + 1),
            (20, |i| if i % 2 == 0 { 3 } else { 1 }),
        ] {
            let backends: Vec<_> = (0..n as u32).map(|i| backend(i, weight_of(i))).collect();
            let table = maglev(&backends, DEFAULT_MAGLEV_SIZE).unwrap();
            assert_eq!(table.len(), DEFAULT_MAGLEV_SIZE as usize);
            assert!(table.iter().all(|&b| (b as usize) < n), "unfilled slot");
            let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
            for (i, count) in shares(&table) {
                let share = DEFAULT_MAGLEV_SIZE as f64 * backends[i as usize].weight as f64
                    / total_weight as f64;
                let error = (count as f64 - share).abs() / share;
                assert!(
                    error <= 0.02,
                    "n={n} backend {i}: {count} slots vs share {share:.1}"
                );
            }
        }
    }

    #[test]
    fn maglev_removal_moves_little_and_re_adding_restores_the_table() {
        for n in [3u32, 10, 50, 100] {
            let all: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let before = by_endpoint(&all, &maglev(&all, DEFAULT_MAGLEV_SIZE).unwrap());
            let removed = all[n as usize / 2].endpoint;
            let fewer: Vec<_> = all
                .iter()
                .copied()
                .filter(|b| b.endpoint != removed)
                .collect();
            let after = by_endpoint(&fewer, &maglev(&fewer, DEFAULT_MAGLEV_SIZE).unwrap());
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let bound = DEFAULT_MAGLEV_SIZE as f64 * (1.0 / n as f64 + 0.01);
            assert!(
                moved as f64 <= bound,
                "n={n}: {moved} slots moved, bound {bound:.0}"
            );
            // Slots of other backends only move to fill the removed one's: none of theirs
            // moves between two survivors beyond that bound (checked above), and adding it
            // back, in any position of the input, restores the table exactly.
            let mut again = fewer.clone();
            again.insert(0, all[n as usize / 2]);
            let restored = by_endpoint(&again, &maglev(&again, DEFAULT_MAGLEV_SIZE).unwrap());
            assert_eq!(restored, before, "n={n}");
        }
    }

    #[test]
    fn maglev_does_not_depend_on_input_order() {
        let backends: Vec<_> = (0..30).map(|i| backend(i, 1 + i % 4)).collect();
        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(
            by_endpoint(&backends, &maglev(&backends, 65_521).unwrap()),
            by_endpoint(&reversed, &maglev(&reversed, 65_521).unwrap())
        );
    }

    #[test]
    fn maglev_rejects_bad_sizes_and_skips_drained_backends() {
        let backends = vec![backend(0, 1), backend(1, 0)];
        assert_eq!(
            maglev(&backends, 65_536),
            Err(ScheduleError::BadTableSize(65_536))
        );
        assert_eq!(
            maglev(&backends, 70_001),
            Err(ScheduleError::BadTableSize(70_001))
        );
        assert!(maglev(&backends, 13).unwrap().iter().all(|&b| b == 0));
        assert!(maglev(&[backend(0, 0)], 13).unwrap().is_empty());
        let many: Vec<_> = (0..13).map(|i| backend(i, 1)).collect();
        assert!(matches!(
            maglev(&many, 13),
            Err(ScheduleError::TableTooSmall { .. })
        ));
    }

    #[test]
    fn maglev_build_time_for_1000_backends() {
        let backends: Vec<_> = (0..1000).map(|i| backend(i, 1)).collect();
        let start = Instant::now();
        let table = maglev(&backends, DEFAULT_MAGLEV_SIZE).unwrap();
        // A figure for the record (this is a debug build), not an assertion on time.
        println!(
            "maglev 1000 backends x {} slots: {:?}",
            table.len(),
            start.elapsed()
        );
        assert_eq!(shares(&table).len(), 1000);
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let backends = vec![backend(0, 3), backend(1, 1)];
        assert_eq!(round_robin(&backends).unwrap(), vec![0, 0, 1, 0]);
        let backends = vec![backend(0, 1), backend(1, 1), backend(2, 1)];
        assert_eq!(round_robin(&backends).unwrap(), vec![0, 1, 2]);
        // gcd reduction: 200/100 is 2/1.
        let backends = vec![backend(0, 200), backend(1, 100)];
        assert_eq!(round_robin(&backends).unwrap(), vec![0, 1, 0]);
        // 5:3:2 over one ring: exact counts, never two of `c` in a row.
        let backends = vec![backend(0, 5), backend(1, 3), backend(2, 2)];
        let ring = round_robin(&backends).unwrap();
        assert_eq!(ring.len(), 10);
        let counts = shares(&ring);
        assert_eq!((counts[&0], counts[&1], counts[&2]), (5, 3, 2));
        assert!(ring.windows(2).all(|w| w != [2, 2]), "{ring:?}");
    }

    #[test]
    fn round_robin_skips_drained_and_bounds_the_ring() {
        assert_eq!(
            round_robin(&[backend(0, 0), backend(1, 2)]).unwrap(),
            vec![1]
        );
        assert!(round_robin(&[backend(0, 0)]).unwrap().is_empty());
        let wide: Vec<_> = (0..300).map(|i| backend(i, 250 + i % 2)).collect();
        assert!(matches!(
            round_robin(&wide),
            Err(ScheduleError::RingTooLong { .. })
        ));
    }

    #[test]
    fn least_connections_fills_the_emptiest_first() {
        let backends = vec![backend(0, 1), backend(1, 1), backend(2, 1)];
        let ring = least_connections(&backends, &[5, 0, 2], false);
        assert_eq!(ring.len(), LEAST_CONNECTIONS_RING);
        // 1 catches up with 2, then both with 0, then all take turns.
        assert_eq!(&ring[..9], &[1, 1, 1, 2, 1, 2, 1, 2, 0]);
        assert_eq!(&ring[9..12], &[1, 2, 0]);
        // Weights count only for wlc; a weight of 0 (drained) takes nothing.
        let backends = vec![backend(0, 3), backend(1, 1), backend(2, 0)];
        let counts = shares(&least_connections(&backends, &[0, 0, 0], true));
        assert_eq!((counts[&0], counts[&1]), (192, 64));
        assert!(!counts.contains_key(&2));
        let counts = shares(&least_connections(&backends, &[0, 0, 0], false));
        assert_eq!((counts[&0], counts[&1]), (128, 128));
        assert!(least_connections(&[backend(0, 0)], &[0], true).is_empty());
        assert_eq!(from_cursor(&[7, 8, 9], 4), vec![9, 7, 8]);
    }

    /// How far the planned ring is from choosing each flow from live counts, when
    /// `burst` new flows arrive between two plans while connections close under them:
    /// the mean and the most connections the chosen backend had above the least
    /// loaded one when it was chosen (0 for the exact choice).
    fn ring_against_exact_choice(burst: usize) -> (f64, u64) {
        let backends = vec![backend(0, 1), backend(1, 1), backend(2, 1)];
        let mut seed = 0x1234_5678u64;
        let mut random = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        // Connections live 50 new flows on average; backend 2's four times longer.
        let close_chance = [0.02, 0.02, 0.005];
        let mut active = vec![0u64; 3];
        let (mut ring, mut excess, mut worst) = (Vec::new(), 0, 0);
        let flows = 5_000;
        for flow in 0..flows {
            for (b, n) in active.iter_mut().enumerate() {
                *n -= (0..*n).filter(|_| random() < close_chance[b]).count() as u64;
            }
            if flow % burst == 0 {
                ring = least_connections(&backends, &active, false);
            }
            let pick = ring[flow % burst] as usize;
            let over = active[pick] - active.iter().min().unwrap();
            (excess, worst) = (excess + over, worst.max(over));
            active[pick] += 1;
        }
        (excess as f64 / flows as f64, worst)
    }

    #[test]
    fn least_connections_ring_against_exact_choice() {
        for burst in [1, 16, 64, 256] {
            let (mean, worst) = ring_against_exact_choice(burst);
            // Figures for the record (README: least connections).
            println!(
                "least connections, {burst} new flows per plan: the chosen backend had \
                 {mean:.2} connections above the least loaded on average, {worst} at most"
            );
            if burst == 1 {
                assert_eq!(worst, 0, "a plan per flow is the live choice");
            }
            if burst == 16 {
                // The README's figure for a plan every 10 ms at 1,600 new flows/s.
                assert!(mean < 1.5, "{mean}");
            }
        }
    }
}
