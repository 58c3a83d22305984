//! Allocator policy (glibc). A tensor program frees and reallocates buffers of the same sizes over
//! and over; glibc serves every request above its mmap threshold (at most 32 MiB) with a fresh
//! `mmap` and returns it with `munmap` on free, so each such buffer is faulted in page by page at
//! every use (and each `munmap` costs a TLB shootdown across cores). Below the threshold freed
//! chunks stay in the heap and are reused without faults.
//!
//! Two settings: [`tune`] for the whole process (the threshold at its maximum, no trimming), and
//! [`ReuseLarge`] for a training loop, whose steps allocate the same large buffers (transformed
//! and fake-quantized weights, their gradients, attention scores) at every step: while it lives
//! every allocation comes from the heap. It is scoped because the heap cannot return a freed chunk
//! from its middle: the same policy over GPTQ or a whole-model rotation raised their peak RSS by
//! 11–18 % through fragmentation, where training's own peak did not move (1B- and 8B-shaped
//! blocks).

/// glibc's largest mmap threshold: requests above it are always mapped afresh.
pub const MMAP_THRESHOLD_MAX: usize = 32 << 20;

/// Keeps buffers up to glibc's largest mmap threshold in the heap and never trims it; call once,
/// before any other thread exists.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// While alive and active, glibc serves every allocation from its heap (no mmap), so large buffers
/// freed by one step are reused by the next. Chunks mapped before it are still unmapped on free.
pub struct ReuseLarge {
    active: bool,
}

/// glibc's default `M_MMAP_MAX`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_MAX_DEFAULT: i32 = 65_536;

impl ReuseLarge {
    /// Active only when the loop's largest buffer, `largest_bytes`, is above the mmap threshold:
    /// below it the heap already reuses every buffer, and the policy would only fragment it
    /// (SmolLM2-135M, whose largest f32 weight is 3.5 MB: peak RSS 455 → 570 MB, no speed gain).
    pub fn for_buffers_of(largest_bytes: usize) -> Self {
        let active = largest_bytes > MMAP_THRESHOLD_MAX;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if active {
            // SAFETY: mallopt takes glibc's arena lock; any thread may call it.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
        }
        ReuseLarge { active }
    }
}

impl Drop for ReuseLarge {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if self.active {
            // SAFETY: as in `for_buffers_of`.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, MMAP_MAX_DEFAULT);
            }
        }
    }
}
