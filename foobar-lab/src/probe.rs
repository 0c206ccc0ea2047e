//! A client that keeps asking: short HTTP requests from inside a namespace, each on a
//! new connection, from a few staggered workers, to see what users see while the
//! balancers fail over. Bounded by its caller's stop and by a hard limit.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long connecting may take: far above a request's millisecond in the lab, far
/// below TCP's one-second SYN retransmission, so a lost SYN costs one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(60);
/// How long the request and the answer may take once connected.
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(15);
/// Each worker starts one attempt per period, which outlasts a failed attempt.
const PERIOD: Duration = Duration::from_millis(100);
/// Workers, evenly out of phase: an attempt starts every PERIOD / WORKERS (10 ms)
/// whatever happens, so the end of an outage is seen within that.
const WORKERS: u32 = 10;
/// No probe runs longer than this, whatever happens to its caller.
const HARD_LIMIT: Duration = Duration::from_secs(60);

/// One attempt: when it ran and the server that answered, if any.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When the attempt started.
    pub started: Instant,
    /// When the attempt finished.
    pub at: Instant,
    /// The body (the server's name), or `None` if it failed.
    pub answer: Option<String>,
}

/// A running probe.
pub struct Probe {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Attempt>>>,
}

impl Probe {
    /// Starts requesting `GET /` from `to`, from inside `ns`.
    pub fn start(ns: &Netns, to: SocketAddrV4) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..WORKERS)
            .map(|i| {
                let flag = stop.clone();
                let ns = ns.handle();
                std::thread::spawn(move || {
                    // Sockets belong to the namespace they are created in.
                    let _inside = ns.enter();
                    let begun = Instant::now();
                    let mut next = begun + PERIOD * i / WORKERS;
                    let mut attempts = Vec::new();
                    while !flag.load(Ordering::Relaxed) && begun.elapsed() < HARD_LIMIT {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        let started = Instant::now();
                        let answer = request(to);
                        attempts.push(Attempt {
                            started,
                            at: Instant::now(),
                            answer,
                        });
                        while next <= Instant::now() {
                            next += PERIOD;
                        }
                    }
                    attempts
                })
            })
            .collect();
        Probe { stop, workers }
    }

    /// Stops and returns every attempt, by the time they ended.
    pub fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Attempt> = self
            .workers
            .into_iter()
            .flat_map(|w| w.join().expect("probe worker"))
            .collect();
        all.sort_by_key(|a| a.at);
        all
    }
}

fn request(to: SocketAddrV4) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), CONNECT_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT)).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: foobar.com\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_owned())
}

/// What a run of attempts shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    /// The longest time without a successful answer: between two successive ones.
    pub longest_gap: Duration,
    /// Failed attempts in all.
    pub failures: usize,
    /// Whether every failed attempt was under way during that longest gap: one outage,
    /// not flapping.
    pub contiguous: bool,
    /// Attempts in all.
    pub attempts: usize,
}

/// Sums up attempts (sorted by end). `None` if fewer than two succeeded.
pub fn outage(attempts: &[Attempt]) -> Option<Outage> {
    let successes: Vec<Instant> = attempts
        .iter()
        .filter(|a| a.answer.is_some())
        .map(|a| a.at)
        .collect();
    let (from, to) = successes
        .windows(2)
        .map(|w| (w[0], w[1]))
        .max_by_key(|(a, b)| *b - *a)?;
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_none()).collect();
    // A failure overlapping the gap: it ended after the gap began and started before
    // the gap ended.
    let contiguous = failed.iter().all(|a| a.at >= from && a.started <= to);
    Some(Outage {
        longest_gap: to - from,
        failures: failed.len(),
        contiguous,
        attempts: attempts.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pattern: &str) -> Vec<Attempt> {
        let t0 = Instant::now();
        pattern
            .chars()
            .enumerate()
            .map(|(i, c)| Attempt {
                started: t0 + Duration::from_millis(10 * i as u64 + 5),
                at: t0 + Duration::from_millis(10 * i as u64 + 9),
                answer: (c == 'o').then(|| "web1".to_owned()),
            })
            .collect()
    }

    #[test]
    fn one_outage_is_contiguous_and_measured() {
        let o = outage(&run("ooo....ooo")).unwrap();
        assert_eq!(o.failures, 4);
        assert!(o.contiguous);
        assert_eq!(o.longest_gap, Duration::from_millis(50));
    }

    #[test]
    fn flapping_and_unrecovered_runs_are_not_contiguous() {
        assert!(!outage(&run("oo..o..oo")).unwrap().contiguous);
        assert!(!outage(&run("o..ooo...o")).unwrap().contiguous);
        assert!(!outage(&run("ooo...")).unwrap().contiguous);
        assert_eq!(outage(&run("..o..")), None);
    }
}
