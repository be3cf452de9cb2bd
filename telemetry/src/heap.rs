//! How much heap the process's code holds: a global allocator wrapper that counts the
//! bytes allocated and not yet freed. Against the resident set it tells a process that
//! holds more (growth in its own data) from an allocator that keeps more (freed memory
//! not returned, fragmentation).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

/// Wraps an allocator (`#[global_allocator] static A: Counting<MiMalloc> =
/// Counting(MiMalloc);`) and counts the bytes its callers hold.
pub struct Counting<A>(pub A);

// SAFETY: every call is forwarded unchanged to the wrapped allocator; the wrapper only
// counts sizes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as is.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { self.0.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Marks the counting allocator as installed (call once from `main`).
pub fn counting() {
    COUNTING.store(true, Ordering::Relaxed);
}

/// Bytes of heap the process's Rust code holds, when [`Counting`] is its global
/// allocator. (C libraries that call `malloc` themselves, librdkafka's, are not counted.)
pub fn live_bytes() -> Option<u64> {
    COUNTING
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_freed_is_no_longer_counted() {
        let a = Counting(std::alloc::System);
        let before = LIVE.load(Ordering::Relaxed);
        let layout = Layout::from_size_align(4096, 8).expect("layout");
        // SAFETY: a valid, non-zero layout; the block is freed with the same layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(LIVE.load(Ordering::Relaxed) - before, 4096);
            let p = a.realloc(p, layout, 8192);
            assert_eq!(LIVE.load(Ordering::Relaxed) - before, 8192);
            a.dealloc(p, Layout::from_size_align(8192, 8).expect("layout"));
        }
        assert_eq!(LIVE.load(Ordering::Relaxed), before);
    }
}
