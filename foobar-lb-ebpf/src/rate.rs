//! Per-CPU one-second windows: how many of something happened this second.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray};
use foobar_lb_common::RateWindow;

/// Counts one more event in this CPU's current window and says whether the window
/// is now over `limit`.
#[inline(always)]
pub fn over(windows: &PerCpuArray<RateWindow>, limit: u32) -> bool {
    match count(windows, limit) {
        Some(window) => window.count > limit,
        None => false,
    }
}

/// As [`over`], but a window over its limit holds the next one over too: a flood
/// seen in one second is still taken for one in the next, not let through again
/// until the limit is reached anew.
#[inline(always)]
pub fn over_or_was(windows: &PerCpuArray<RateWindow>, limit: u32) -> bool {
    match count(windows, limit) {
        Some(window) => window.count > limit || window.previous_over != 0,
        None => false,
    }
}

/// Counts one event in this CPU's window, opening a new window each second.
#[inline(always)]
fn count(windows: &PerCpuArray<RateWindow>, limit: u32) -> Option<&'static mut RateWindow> {
    // Index 0 always exists; the verifier wants the check.
    let window = unsafe { &mut *windows.get_ptr_mut(0)? };
    let now = unsafe { bpf_ktime_get_ns() };
    let elapsed = now.wrapping_sub(window.started_ns);
    if elapsed > 1_000_000_000 {
        // Held only by the window just before; after a quiet second, nothing is.
        window.previous_over = (elapsed < 2_000_000_000 && window.count > limit) as u32;
        window.started_ns = now;
        window.count = 0;
    }
    window.count = window.count.saturating_add(1);
    Some(window)
}
