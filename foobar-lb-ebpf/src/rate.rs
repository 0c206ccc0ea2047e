//! Per-CPU one-second windows: how many of something happened this second.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray};
use foobar_lb_common::RateWindow;

/// Counts one more event in this CPU's current window and says whether the window
/// is now over `limit`.
#[inline(always)]
pub fn over(windows: &PerCpuArray<RateWindow>, limit: u32) -> bool {
    // Index 0 always exists; the verifier wants the check.
    let Some(window) = windows.get_ptr_mut(0) else {
        return false;
    };
    let window = unsafe { &mut *window };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(window.started_ns) > 1_000_000_000 {
        window.started_ns = now;
        window.count = 0;
    }
    window.count += 1;
    window.count > limit as u64
}
