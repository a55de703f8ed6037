//! CPU and heap profiling, the way ws2api offers it (`--cpuprofile`, `--memprofile`), in pprof
//! format so that `go tool pprof` or `pprof` read the files.
//!
//! - CPU: pprof-rs samples the whole process with `SIGPROF` at [`CPU_SAMPLE_HZ`] from [`start`]
//!   until [`ProfileGuard::finish`], which writes a protobuf profile (or, for a file name ending
//!   in `.svg`, a flame graph).
//! - Heap: jemalloc's own sampling profiler, switched on by [`start`] and dumped through
//!   `jemalloc_pprof` (gzipped protobuf, symbolized in-process) by [`heap_profile`] on demand and
//!   by [`ProfileGuard::finish`] at shutdown. This needs jemalloc as the global allocator (cargo
//!   feature `jemalloc`, on by default), which this module installs.

use std::fmt;
use std::path::{Path, PathBuf};

/// CPU sampling frequency in Hz. Slightly off 100 Hz so that sampling does not run in lockstep
/// with timers that fire at round intervals.
pub const CPU_SAMPLE_HZ: i32 = 99;

/// jemalloc as the global allocator, built with profiling support.
///
/// Besides heap profiling, this is also the allocator choice for the gateway as a whole: it held
/// idle sockets in less memory than glibc's malloc in our measurements (see
/// `vendor/tokio-websockets/PATCH.md`). Build with `--no-default-features` for the system
/// allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options (tikv-jemallocator prefixes jemalloc's symbols with `_rjem_`).
///
/// `prof:true` must be set before the first allocation for heap profiling to be possible at all;
/// `prof_active:false` keeps it switched off (no sampling, no backtraces) until [`start`] is
/// given a `--memprofile` file. `lg_prof_sample:19` samples on average once every 512 KiB
/// allocated. The environment variable `_RJEM_MALLOC_CONF` is read after this and overrides it.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";

/// Why a profile could not be started, taken or written.
#[derive(Debug)]
pub enum ProfileError {
    /// pprof-rs could not start the CPU profiler or build its report.
    Cpu(pprof::Error),
    /// Heap profiling is not available or not active; the text says why.
    HeapUnavailable(&'static str),
    /// jemalloc refused a profiling request or its dump could not be converted.
    Heap(String),
    /// A profile file could not be written.
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu(e) => write!(f, "CPU profiler: {e}"),
            Self::HeapUnavailable(why) => write!(f, "heap profiling unavailable: {why}"),
            Self::Heap(e) => write!(f, "heap profiler: {e}"),
            Self::Write { path, source } => {
                write!(f, "cannot write profile {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ProfileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Cpu(e) => Some(e),
            Self::Write { source, .. } => Some(source),
            Self::HeapUnavailable(_) | Self::Heap(_) => None,
        }
    }
}

impl From<pprof::Error> for ProfileError {
    fn from(e: pprof::Error) -> Self {
        Self::Cpu(e)
    }
}

/// The running profilers; [`ProfileGuard::finish`] writes their profiles.
///
/// Dropping the guard without `finish` stops the CPU profiler and writes nothing.
#[must_use = "call finish() at shutdown to write the profiles"]
pub struct ProfileGuard {
    /// The CPU profiler and the file its profile goes to.
    cpu: Option<(pprof::ProfilerGuard<'static>, PathBuf)>,
    /// The file the heap profile goes to.
    heap: Option<PathBuf>,
}

impl fmt::Debug for ProfileGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileGuard")
            .field("cpu_profile", &self.cpu.as_ref().map(|(_, path)| path))
            .field("mem_profile", &self.heap)
            .finish()
    }
}

/// Starts the profilers asked for; returns a guard.
///
/// With neither file the guard does nothing. Only one CPU profiler can run in a process at a time.
pub fn start(
    cpu_profile: Option<PathBuf>,
    mem_profile: Option<PathBuf>,
) -> Result<ProfileGuard, ProfileError> {
    // Heap first: it can fail for reasons of the build, before any sampling has started.
    if mem_profile.is_some() {
        heap::activate()?;
    }
    let cpu = match cpu_profile {
        Some(path) => {
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(CPU_SAMPLE_HZ)
                // Unwinding through these from a signal handler can deadlock or crash.
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()?;
            Some((guard, path))
        }
        None => None,
    };
    Ok(ProfileGuard {
        cpu,
        heap: mem_profile,
    })
}

impl ProfileGuard {
    /// Writes the profiles (called once at graceful shutdown).
    ///
    /// Both profiles are attempted even if one fails; the first error is returned.
    pub fn finish(self) -> Result<(), ProfileError> {
        let cpu_result = match self.cpu {
            Some((guard, path)) => write_cpu_profile(&guard, &path),
            None => Ok(()),
        };
        let heap_result = match self.heap {
            Some(path) => heap::dump_blocking()
                .and_then(|profile| write_file(&path, &profile))
                .and(heap::deactivate()),
            None => Ok(()),
        };
        cpu_result.and(heap_result)
    }
}

/// A heap profile in pprof protobuf form (gzipped, for GET /debug/pprof/heap); Err when heap
/// profiling is not active.
pub async fn heap_profile() -> Result<Vec<u8>, ProfileError> {
    heap::dump().await
}

/// Builds the CPU report and writes it: a flame graph for `*.svg`, else pprof protobuf.
fn write_cpu_profile(
    guard: &pprof::ProfilerGuard<'static>,
    path: &Path,
) -> Result<(), ProfileError> {
    let report = guard.report().build()?;
    let mut bytes = Vec::new();
    if path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("svg"))
    {
        report.flamegraph(&mut bytes)?;
    } else {
        use pprof::protos::Message;
        let profile = report.pprof()?;
        profile
            .encode(&mut bytes)
            .map_err(|e| ProfileError::Cpu(pprof::Error::IoError(std::io::Error::other(e))))?;
    }
    write_file(path, &bytes)
}

/// Writes `bytes` to `path`, naming the file in the error.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ProfileError> {
    std::fs::write(path, bytes).map_err(|source| ProfileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// jemalloc heap profiling through `jemalloc_pprof`.
#[cfg(feature = "jemalloc")]
mod heap {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use jemalloc_pprof::{JemallocProfCtl, PROF_CTL};
    use tokio::sync::MutexGuard;

    use super::ProfileError;

    /// How long [`dump_blocking`] waits for a concurrent on-demand dump to finish.
    const LOCK_WAIT: Duration = Duration::from_secs(10);

    /// Why there is no profiler control.
    const NOT_ENABLED: &str = "jemalloc was started without prof:true (check _RJEM_MALLOC_CONF)";

    /// The process-wide profiler control, if jemalloc was started with `prof:true`.
    fn ctl() -> Result<&'static tokio::sync::Mutex<JemallocProfCtl>, ProfileError> {
        PROF_CTL
            .as_deref()
            .ok_or(ProfileError::HeapUnavailable(NOT_ENABLED))
    }

    /// Locks the control from synchronous code, also when called inside the async runtime
    /// (where `blocking_lock` would panic): the lock is only ever held for one dump.
    fn lock_blocking() -> Result<MutexGuard<'static, JemallocProfCtl>, ProfileError> {
        let ctl = ctl()?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            if let Ok(guard) = ctl.try_lock() {
                return Ok(guard);
            }
            if Instant::now() >= deadline {
                return Err(ProfileError::Heap("profiler busy".to_owned()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts sampling allocations.
    pub(super) fn activate() -> Result<(), ProfileError> {
        lock_blocking()?
            .activate()
            .map_err(|e| ProfileError::Heap(format!("activate: {e}")))
    }

    /// Stops sampling and forgets the samples taken.
    pub(super) fn deactivate() -> Result<(), ProfileError> {
        lock_blocking()?
            .deactivate()
            .map_err(|e| ProfileError::Heap(format!("deactivate: {e}")))
    }

    /// Dumps the current heap profile as gzipped pprof protobuf.
    fn dump_locked(ctl: &mut JemallocProfCtl) -> Result<Vec<u8>, ProfileError> {
        if !ctl.activated() {
            return Err(ProfileError::HeapUnavailable(
                "not active (start the gateway with --memprofile FILE)",
            ));
        }
        ctl.dump_pprof()
            .map_err(|e| ProfileError::Heap(format!("dump: {e:#}")))
    }

    /// [`dump_locked`] from synchronous code.
    pub(super) fn dump_blocking() -> Result<Vec<u8>, ProfileError> {
        dump_locked(&mut *lock_blocking()?)
    }

    /// [`dump_locked`] from async code; the dump (a temporary file, parsing and symbolizing)
    /// runs on the blocking pool.
    pub(super) async fn dump() -> Result<Vec<u8>, ProfileError> {
        let ctl = PROF_CTL
            .as_ref()
            .map(Arc::clone)
            .ok_or(ProfileError::HeapUnavailable(NOT_ENABLED))?;
        let mut guard = ctl.lock_owned().await;
        tokio::task::spawn_blocking(move || dump_locked(&mut guard))
            .await
            .map_err(|e| ProfileError::Heap(format!("dump task: {e}")))?
    }
}

/// Stand-in when built without jemalloc: heap profiling is unavailable.
#[cfg(not(feature = "jemalloc"))]
mod heap {
    use super::ProfileError;

    /// Why there is no heap profile.
    const WHY: &str = "built without the jemalloc feature";

    /// Always fails.
    pub(super) fn activate() -> Result<(), ProfileError> {
        Err(ProfileError::HeapUnavailable(WHY))
    }

    /// Nothing to stop.
    pub(super) fn deactivate() -> Result<(), ProfileError> {
        Ok(())
    }

    /// Always fails.
    pub(super) fn dump_blocking() -> Result<Vec<u8>, ProfileError> {
        Err(ProfileError::HeapUnavailable(WHY))
    }

    /// Always fails.
    pub(super) async fn dump() -> Result<Vec<u8>, ProfileError> {
        Err(ProfileError::HeapUnavailable(WHY))
    }
}
