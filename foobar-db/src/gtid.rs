//! MariaDB's GTID positions (`domain-server-seq`, one per domain, comma-separated) and
//! the errant-transaction check a node must pass before it replicates from a new
//! primary. MariaDB has no GTID set functions, so the comparison is done here.

use std::fmt;

/// One GTID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gtid {
    /// Replication domain.
    pub domain: u32,
    /// The server that wrote it.
    pub server: u32,
    /// Sequence number within the domain.
    pub seq: u64,
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// A position or a state: a list of GTIDs (`''` is the empty list).
pub fn parse(list: &str) -> Result<Vec<Gtid>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let mut parts = item.split('-');
            let (Some(d), Some(s), Some(n), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("{item:?} is not domain-server-seq"));
            };
            let bad = |_| format!("{item:?} is not domain-server-seq");
            Ok(Gtid {
                domain: d.parse().map_err(bad)?,
                server: s.parse().map_err(bad)?,
                seq: n.parse().map_err(bad)?,
            })
        })
        .collect()
}

/// The GTIDs of `position` (a node's `gtid_binlog_pos`: its last transaction per
/// domain) that `state` (the primary's `gtid_binlog_state`: the last transaction
/// per domain and server) does not hold: transactions written on the node that the
/// primary never had. Comparing sequence numbers per domain alone would miss them
/// (`0-1-105` is not in a binary log at `0-2-120` unless server 1 reached 105 there).
pub fn errant(position: &[Gtid], state: &[Gtid]) -> Vec<Gtid> {
    position
        .iter()
        .filter(|mine| {
            !state.iter().any(|theirs| {
                theirs.domain == mine.domain
                    && theirs.server == mine.server
                    && theirs.seq >= mine.seq
            })
        })
        .copied()
        .collect()
}

/// Whether `have` has reached `want` in every domain of `want`.
pub fn reached(have: &[Gtid], want: &[Gtid]) -> bool {
    want.iter()
        .all(|w| have.iter().any(|h| h.domain == w.domain && h.seq >= w.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("0-11-1042,1-12-7").unwrap(),
            vec![
                Gtid {
                    domain: 0,
                    server: 11,
                    seq: 1042
                },
                Gtid {
                    domain: 1,
                    server: 12,
                    seq: 7
                }
            ]
        );
        assert!(parse("0-1").is_err());
        assert!(parse("0-1-x").is_err());
        assert!(parse("0-1-2-3").is_err());
    }

    #[test]
    fn finds_errant_transactions_by_server() {
        let state = parse("0-1-104,0-2-120").unwrap();
        // The old primary (server 1) wrote 105 that never reached the new one.
        assert_eq!(
            errant(&parse("0-1-105").unwrap(), &state),
            parse("0-1-105").unwrap()
        );
        // Everything it wrote is there.
        assert!(errant(&parse("0-1-104").unwrap(), &state).is_empty());
        // It replicated the new primary's transactions: nothing of its own.
        assert!(errant(&parse("0-2-118").unwrap(), &state).is_empty());
        // A fresh node has nothing.
        assert!(errant(&[], &state).is_empty());
    }

    #[test]
    fn reached_compares_sequence_per_domain() {
        let have = parse("0-2-10").unwrap();
        assert!(reached(&have, &parse("0-1-10").unwrap()));
        assert!(!reached(&have, &parse("0-1-11").unwrap()));
        assert!(!reached(&have, &parse("1-1-1").unwrap()));
        assert!(reached(&have, &[]));
    }
}
