//! What the speaker shows `status`, the status page and `/metrics`.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

use super::{
    bird,
    config::{BgpConfig, Neighbour},
    control::{BfdSession, Protocol},
};

/// Whether BIRD runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpeakerState {
    /// Started, not answering yet.
    #[default]
    Starting,
    /// Answering on its control socket.
    Running,
    /// Exited; started again after a back-off.
    Restarting,
}

impl SpeakerState {
    /// The name used in the status page and the CLI.
    pub fn label(self) -> &'static str {
        match self {
            SpeakerState::Starting => "starting",
            SpeakerState::Running => "running",
            SpeakerState::Restarting => "restarting",
        }
    }
}

/// A BGP session's state (RFC 4271's finite state machine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Not trying (BIRD down, protocol down, or waiting after an error).
    #[default]
    Idle,
    /// Connecting.
    Connect,
    /// Waiting to connect again, or for the router to connect.
    Active,
    /// OPEN sent.
    OpenSent,
    /// OPEN received.
    OpenConfirm,
    /// Up: the routes are exchanged.
    Established,
}

impl SessionState {
    /// From `show protocols`: BIRD's protocol state and the info column, whose first
    /// word is the session state unless the protocol is down.
    pub fn from_bird(protocol_state: &str, info: &str) -> SessionState {
        if matches!(protocol_state, "down" | "flush") {
            return SessionState::Idle;
        }
        match info.split_whitespace().next().unwrap_or("") {
            "Connect" => SessionState::Connect,
            "Active" | "Passive" => SessionState::Active,
            "OpenSent" => SessionState::OpenSent,
            "OpenConfirm" => SessionState::OpenConfirm,
            "Established" => SessionState::Established,
            // Idle, Close (closing) and Down.
            _ => SessionState::Idle,
        }
    }

    /// The name used in JSON, the status page and the CLI.
    pub fn label(self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::Connect => "connect",
            SessionState::Active => "active",
            SessionState::OpenSent => "opensent",
            SessionState::OpenConfirm => "openconfirm",
            SessionState::Established => "established",
        }
    }
}

/// A BFD session's state, as far as the BGP session cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BfdState {
    /// Up.
    Up,
    /// Down, initialising, or absent.
    Down,
}

/// One BGP session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The router.
    pub neighbour: IpAddr,
    /// Its AS.
    pub remote_as: u32,
    /// The session's state.
    pub state: SessionState,
    /// Its BFD session's state; none when the session does not use BFD.
    pub bfd: Option<BfdState>,
    /// When the protocol's state last changed, in BIRD's time format.
    pub since: Option<String>,
    /// BIRD's words on it (the last error, for one).
    #[serde(default)]
    pub info: String,
}

impl SessionStatus {
    /// The session before BIRD said anything, or while it does not run.
    pub fn down(config: &BgpConfig, neighbour: &Neighbour, info: &str) -> SessionStatus {
        SessionStatus {
            neighbour: neighbour.address,
            remote_as: neighbour.remote_as,
            state: SessionState::Idle,
            bfd: config.uses_bfd(neighbour).then_some(BfdState::Down),
            since: None,
            info: info.to_owned(),
        }
    }

    /// The session as BIRD's `show protocols` and `show bfd sessions` show it.
    pub fn from_bird(
        config: &BgpConfig,
        neighbour: &Neighbour,
        protocols: &[Protocol],
        bfd: &[BfdSession],
    ) -> SessionStatus {
        let name = bird::protocol_name(neighbour.address);
        let Some(protocol) = protocols.iter().find(|p| p.name == name) else {
            return SessionStatus::down(config, neighbour, "not among BIRD's protocols");
        };
        let bfd_up = bfd
            .iter()
            .any(|s| s.address == neighbour.address && s.state == "Up");
        SessionStatus {
            neighbour: neighbour.address,
            remote_as: neighbour.remote_as,
            state: SessionState::from_bird(&protocol.state, &protocol.info),
            bfd: config.uses_bfd(neighbour).then_some(if bfd_up {
                BfdState::Up
            } else {
                BfdState::Down
            }),
            since: Some(protocol.since.clone()).filter(|s| !s.is_empty()),
            info: protocol.info.clone(),
        }
    }
}

/// A VIP address that may be announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    /// The address (announced as /32 or /128).
    pub address: IpAddr,
    /// Whether BIRD has its route now (this balancer announces it to every session
    /// that is up), whatever the agent asked.
    pub announced: bool,
    /// Why not; or, while BIRD still has a route the agent asks to withdraw, why that
    /// is asked and why BIRD has not taken it yet; empty otherwise.
    pub reason: String,
}

/// The BGP speaker as `status` shows it (`"bgp"` in its JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    /// Whether BIRD runs.
    pub speaker: SpeakerState,
    /// One per neighbour, in configuration order.
    pub sessions: Vec<SessionStatus>,
    /// Each address that may be announced, and whether it is.
    pub vips: Vec<VipAnnouncement>,
    /// Addresses that started to be announced, since the agent started.
    pub announcements: u64,
    /// Addresses withdrawn, since the agent started.
    pub withdrawals: u64,
    /// Times BIRD was started again after it exited.
    #[serde(default)]
    pub speaker_restarts: u64,
}

impl BgpStatus {
    /// Before BIRD starts: every session idle, nothing announced.
    pub fn new(config: &BgpConfig) -> BgpStatus {
        BgpStatus {
            sessions: config
                .neighbours
                .iter()
                .map(|n| SessionStatus::down(config, n, "BIRD is starting"))
                .collect(),
            ..BgpStatus::default()
        }
    }
}

/// The speaker's status, shared with the agent.
pub type BgpView = Arc<Mutex<BgpStatus>>;

/// The status, whoever panicked while holding it.
pub fn lock(view: &BgpView) -> MutexGuard<'_, BgpStatus> {
    view.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::control::{ReplyReader, parse_bfd_sessions, parse_protocols};

    fn config() -> BgpConfig {
        toml::from_str(
            r#"
            local_as = 65001
            announce_from = "10.0.0.3"
            bfd = { interval_ms = 50, multiplier = 3 }
            neighbours = [
              { address = "10.0.0.254", remote_as = 65000 },
              { address = "10.0.0.253", remote_as = 65000, bfd = false },
              { address = "10.0.0.252", remote_as = 65002 },
            ]
            "#,
        )
        .unwrap_or_else(|e| panic!("a [bgp] section: {e}"))
    }

    fn reply(raw: &str) -> crate::bgp::control::Reply {
        let mut reader = ReplyReader::default();
        raw.lines()
            .find_map(|l| reader.push(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .unwrap_or_else(|| panic!("no final line in {raw}"))
    }

    #[test]
    fn sessions_from_birds_tables() {
        let protocols = parse_protocols(&reply(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-peer_10_0_0_254 BGP        ---        up     10:21:47.120  Established   \n \
             peer_10_0_0_253 BGP        ---        start  10:21:43.381  Connect       \n\
             0000 \n",
        ));
        let bfd = parse_bfd_sessions(&reply(
            "1020-bfd1:\n \
             IP address                Interface  State      Since         Interval  Timeout\n \
             10.0.0.254                lbc        Up         10:21:44.002    0.050    0.150\n\
             0000 \n",
        ));
        let c = config();
        let s: Vec<SessionStatus> = c
            .neighbours
            .iter()
            .map(|n| SessionStatus::from_bird(&c, n, &protocols, &bfd))
            .collect();
        assert_eq!(s[0].state, SessionState::Established);
        assert_eq!(s[0].bfd, Some(BfdState::Up));
        assert_eq!(s[0].since.as_deref(), Some("10:21:47.120"));
        assert_eq!(s[1].state, SessionState::Connect);
        assert_eq!(s[1].bfd, None, "bfd = false");
        assert_eq!(s[2].state, SessionState::Idle, "not in BIRD's table");
        assert_eq!(s[2].bfd, Some(BfdState::Down));
        assert_eq!(s[2].since, None);
    }

    #[test]
    fn states_from_birds_words() {
        for (state, info, expected) in [
            ("up", "Established", SessionState::Established),
            (
                "start",
                "Active        Socket: Connection refused",
                SessionState::Active,
            ),
            ("start", "OpenSent", SessionState::OpenSent),
            ("start", "OpenConfirm", SessionState::OpenConfirm),
            ("start", "Idle", SessionState::Idle),
            ("down", "Error: Hold timer expired", SessionState::Idle),
            ("stop", "Close", SessionState::Idle),
        ] {
            assert_eq!(
                SessionState::from_bird(state, info),
                expected,
                "{state} {info}"
            );
        }
    }

    #[test]
    fn json_is_as_documented() {
        let c = config();
        let mut status = BgpStatus::new(&c);
        status.speaker = SpeakerState::Running;
        status.sessions[0].state = SessionState::OpenConfirm;
        status.vips.push(VipAnnouncement {
            address: "10.0.0.100".parse().unwrap_or_else(|e| panic!("{e}")),
            announced: true,
            reason: String::new(),
        });
        let json = serde_json::to_value(&status).unwrap_or_else(|e| panic!("serializes: {e}"));
        assert_eq!(json["speaker"], "running");
        assert_eq!(json["sessions"][0]["neighbour"], "10.0.0.254");
        assert_eq!(json["sessions"][0]["remote_as"], 65000);
        assert_eq!(json["sessions"][0]["state"], "openconfirm");
        assert_eq!(json["sessions"][0]["bfd"], "down");
        assert!(json["sessions"][0]["since"].is_null());
        assert!(json["sessions"][1]["bfd"].is_null());
        assert_eq!(json["vips"][0]["address"], "10.0.0.100");
        assert_eq!(json["vips"][0]["announced"], true);
        assert_eq!(json["vips"][0]["reason"], "");
        assert_eq!(json["announcements"], 0);
        assert_eq!(json["withdrawals"], 0);
        for state in [SessionState::OpenSent, SessionState::Established] {
            let text = serde_json::to_string(&state).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(text, format!("\"{}\"", state.label()));
        }
    }
}
