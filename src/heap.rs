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

/// Elements below which [`zeroed`] clears on the calling thread (256 KiB of f32).
const PAR_ZERO_MIN: usize = 1 << 16;

/// `vec![T::default(); n]` (zeros for the numeric types), cleared by the thread pool when large.
/// An op's output allocated on the calling thread is otherwise cleared by one core (glibc's
/// `calloc` clears every chunk the heap reuses) while the pool's other threads wait.
pub fn zeroed<T: Copy + Default + Send>(n: usize) -> Vec<T> {
    if n < PAR_ZERO_MIN {
        return vec![T::default(); n];
    }
    par_filled(n, PAR_ZERO_MIN, |_, _| {})
}

/// A vector of `n` elements made in parallel chunks of `chunk`: chunk `i` (elements
/// `i·chunk..`) is cleared and then handed to `fill(i, chunk)`. Each chunk is cleared while the
/// task that fills it holds it in cache, instead of in a separate pass over the whole buffer.
pub fn par_filled<T, F>(n: usize, chunk: usize, fill: F) -> Vec<T>
where
    T: Copy + Default + Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    par_filled_with(n, chunk, || (), |_, i, c| fill(i, c))
}

/// [`par_filled`] with per-task scratch made by `init` (as rayon's `for_each_init`).
pub fn par_filled_with<T, S, I, F>(n: usize, chunk: usize, init: I, fill: F) -> Vec<T>
where
    T: Copy + Default + Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each_init(init, |s, (i, c)| {
            for x in c.iter_mut() {
                x.write(T::default());
            }
            // SAFETY: every element of `c` was written just above, and `MaybeUninit<T>` has
            // `T`'s layout.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            fill(s, i, c);
        });
    // SAFETY: the chunks cover the first `n` elements, and each was written.
    unsafe { v.set_len(n) };
    v
}

/// Chunk `i` of `x` in chunks of `chunk` (the last may be shorter), as [`par_filled`] hands out.
#[inline]
pub fn chunk_of<T>(x: &[T], i: usize, chunk: usize) -> &[T] {
    &x[i * chunk..((i + 1) * chunk).min(x.len())]
}
