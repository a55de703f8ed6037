//! jemalloc's compiled-in options for ws2http, as the `_rjem_malloc_conf` symbol that jemalloc
//! (as built by tikv-jemalloc-sys, with its `_rjem_` symbol prefix) reads when it starts.
//!
//! This lives in its own crate because defining an exported symbol counts as unsafe code, which
//! the ws2http crate denies. The crate must be named somewhere in code that is linked (ws2http's
//! `profile` module reads [`OPTIONS`]): rustc then keeps the exported symbol in the final link.
//!
//! - `prof:true` makes heap profiling possible; jemalloc only honours it at start-up.
//! - `prof_active:false` keeps the profiler off (no sampling, no backtraces) until ws2http is
//!   given `--memprofile FILE` and switches it on through `mallctl("prof.active")`.
//! - `lg_prof_sample:19` samples on average once every 2^19 bytes (512 KiB) allocated.
//! - `background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0`: a jemalloc thread purges
//!   freed pages about a second after they are freed, straight back to the OS (`muzzy` pages,
//!   released with `MADV_FREE`, would still count in RSS), so resident memory falls after
//!   connections leave. Release gateway, 5,000 idle websockets held and then closed, RSS 15 s
//!   later (baseline 7.2 MiB): 63.7 MiB with jemalloc's defaults, 53.5 MiB with only
//!   `background_thread:true`, 11.6 and 13.0 MiB with these. A 100-connection flood showed no
//!   CPU cost (19.9 and 23.5 µs of gateway CPU per message with these, 21.7 and 19.9 without;
//!   two noisy runs each on a shared 2-core machine).
//! - `slab_sizes:1-4096:16|4097-16384:64`: the small size classes up to 4 KiB are carved from
//!   64 KiB slabs, the larger ones (5 to 14 KiB: handshake and request buffers, mostly short
//!   lived) from 256 KiB slabs, instead of slabs of one to a few pages. jemalloc keeps one descriptor (`edata`, 128 bytes) per slab in
//!   metadata it never gives back to the OS, so 15,000 held connections left 1.6 MiB of
//!   descriptors behind after they closed (jemalloc's statistics, a build with its `stats`
//!   feature); with 16-page slabs 0.3 MiB. Scenario S1 (15,000 idle websockets, RSS 15 s after
//!   they left), three runs each: +29-31% over the baseline with jemalloc's default slabs,
//!   +14-15% with these; RSS per held connection 3.39-3.44 KiB before, 3.54-3.68 KiB with them.
//!   32 pages gave the same, 8 pages +17%, 64 pages 4.06 KiB per connection. The flood's CPU
//!   per message did not move beyond the noise. Later, with shallower worker stacks, 64 KiB
//!   slabs for every class gave +9.3-10.8% (fifteen runs); 256 KiB slabs for the classes above
//!   4 KiB +8.7-9.3% (four runs alternated with them; 128 KiB for those: +9.3-9.7%; 128 KiB
//!   for every class: +9.2%; 16 KiB for those above 4 KiB: +16.5%), at the same 3.6-3.8 KiB
//!   per held connection and the same flood CPU per message.
//!
//! The environment variable `_RJEM_MALLOC_CONF` is read after these and overrides them.
//!
//! [`flush_thread_cache`] lives here for the same reason: it is a foreign call.
#![no_std]

use core::ffi::{c_char, CStr};

/// The options, in jemalloc's `malloc_conf` syntax.
pub const OPTIONS: &CStr = c"prof:true,prof_active:false,lg_prof_sample:19,\
    background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,\
    slab_sizes:1-4096:16|4097-16384:64";

/// Returns the calling thread's jemalloc cache of freed blocks to the shared arenas
/// (`mallctl("thread.tcache.flush")`), so that pages emptied by a crowd of departed connections
/// can be purged instead of staying pinned by a thread that has since gone idle. Returns
/// jemalloc's error number if it refused.
pub fn flush_thread_cache() -> Result<(), i32> {
    // SAFETY: `thread.tcache.flush` is a void control: it reads and writes nothing, so null
    // pointers and a zero length are what it takes; the name is NUL-terminated.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            0,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(status)
    }
}

/// A C string pointer that can live in a `static`.
#[repr(transparent)]
pub struct ConfPtr(*const c_char);

// SAFETY: the pointer refers to an immutable, 'static, NUL-terminated string.
unsafe impl Sync for ConfPtr {}

/// jemalloc's `const char *malloc_conf`, under tikv-jemalloc-sys's prefixed name. jemalloc's own
/// definition is weak, so this one takes its place.
// SAFETY: nothing else in the process defines this symbol (jemalloc's copy is weak), and its type
// matches jemalloc's declaration: one pointer to a NUL-terminated string.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: ConfPtr = ConfPtr(OPTIONS.as_ptr());

#[cfg(test)]
mod tests {
    use super::OPTIONS;

    #[test]
    fn options_are_comma_separated_key_value_pairs_without_spaces() {
        let options = OPTIONS.to_str().unwrap();
        assert!(!options.contains(char::is_whitespace), "{options:?}");
        for option in options.split(',') {
            let (key, value) = option.split_once(':').unwrap();
            assert!(!key.is_empty() && !value.is_empty(), "{option:?}");
        }
        assert!(options.contains("background_thread:true,dirty_decay_ms:1000"));
    }

    #[test]
    fn jemalloc_accepts_a_thread_cache_flush() {
        // jemalloc is not this test's global allocator: use it once so this thread has a cache.
        // SAFETY: a plain malloc/free pair of jemalloc's own functions.
        unsafe { tikv_jemalloc_sys::free(tikv_jemalloc_sys::malloc(64)) };
        assert_eq!(super::flush_thread_cache(), Ok(()));
    }
}
