//! jemalloc's compiled-in options for ws2http, as the `_rjem_malloc_conf` symbol that jemalloc
//! (as built by tikv-jemalloc-sys, with its `_rjem_` symbol prefix) reads when it starts.
//!
//! This lives in its own crate because defining an exported symbol counts as unsafe code, which
//! the ws2http crate forbids. The crate must be named somewhere in code that is linked (ws2http's
//! `profile` module reads [`OPTIONS`]): rustc then keeps the exported symbol in the final link.
//!
//! - `prof:true` makes heap profiling possible; jemalloc only honours it at start-up.
//! - `prof_active:false` keeps the profiler off (no sampling, no backtraces) until ws2http is
//!   given `--memprofile FILE` and switches it on through `mallctl("prof.active")`.
//! - `lg_prof_sample:19` samples on average once every 2^19 bytes (512 KiB) allocated.
//!
//! The environment variable `_RJEM_MALLOC_CONF` is read after these and overrides them.
#![no_std]

use core::ffi::{c_char, CStr};

/// The options, in jemalloc's `malloc_conf` syntax.
pub const OPTIONS: &CStr = c"prof:true,prof_active:false,lg_prof_sample:19";

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
