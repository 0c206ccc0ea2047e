//! Active-active scale-out over BGP: every balancer announces its healthy VIP
//! addresses to the routers, which spread flows over the balancers by ECMP. Since the
//! routers move flows between balancers (a rehash when one joins or leaves) and flow
//! state is not shared, only hash schedulers (maglev, sh) may serve an announced
//! address: every balancer then picks the same backend for a flow.
//!
//! The BGP speaker is BIRD 2, run and driven by the agent: [`config`] is the `[bgp]`
//! section, [`announce`] the rule deciding what to announce, [`bird`] writes
//! `bird.conf`, [`control`] speaks BIRD's control socket, [`speaker`] runs BIRD as a
//! child, and [`status`] is what `status` and `/metrics` show.

pub mod announce;
pub mod bird;
pub mod config;
pub mod control;
pub mod speaker;
pub mod status;

pub use announce::{Want, Wanted, decide};
pub use config::{BfdConfig, BgpConfig, Neighbour};
pub use speaker::{BgpError, Speaker};
pub use status::{BgpStatus, BgpView};
