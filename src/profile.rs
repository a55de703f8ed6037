//! CPU and heap profiling, the way ws2api offers it (`--cpuprofile`, `--memprofile`), in pprof
//! format so that `go tool pprof` or `pprof` read the files.
//!
//! - CPU: pprof-rs samples the whole process with `SIGPROF` at [`CPU_SAMPLE_HZ`] from [`start`]
//!   until [`ProfileGuard::finish`], which writes a protobuf profile (or, for a file name ending
//!   in `.svg`, a flame graph).
//! - Heap: jemalloc's own sampling profiler, switched on by [`start`] and dumped through
//!   `jemalloc_pprof` (gzipped protobuf) by [`heap_profile`] on demand and by
//!   [`ProfileGuard::finish`] at shutdown. This needs jemalloc as the global allocator (cargo
//!   feature `jemalloc`, on by default), which this module installs. Heap profiles carry
//!   addresses, not names: read them with the binary (`go tool pprof target/release/ws2http
//!   heap.pb.gz`). Symbolizing in the gateway kept ~100 MiB of parsed debug info resident after
//!   the first on-demand profile of a busy gateway.

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
/// allocator, or `--no-default-features --features mimalloc` for mimalloc (both measured in the
/// README's Performance section).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// mimalloc as the global allocator, for comparing allocators (cargo feature `mimalloc`).
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "mimalloc", feature = "jemalloc"))]
compile_error!("features `jemalloc` and `mimalloc` each pick the global allocator: build mimalloc with --no-default-features --features mimalloc");

/// jemalloc's compiled-in options: heap profiling possible but off until [`start`] is given a
/// `--memprofile` file, and freed pages handed back to the OS after about a second. They are
/// exported from the `ws2http-jemalloc-conf` crate, which also has the measurements (an exported
/// symbol counts as unsafe code, which this crate denies); naming the crate here keeps its symbol
/// in the link. `_RJEM_MALLOC_CONF` in the environment overrides them.
#[cfg(feature = "jemalloc")]
pub const JEMALLOC_OPTIONS: &std::ffi::CStr = ws2http_jemalloc_conf::OPTIONS;

/// Least time between two flushes of one thread's allocator cache by [`on_worker_park`].
pub const THREAD_CACHE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// For the runtime's `on_thread_park` hook: when a worker thread runs out of work, hand the
/// blocks its allocator cache holds back to the shared arenas, at most once per
/// [`THREAD_CACHE_FLUSH_INTERVAL`]. A worker that goes idle after thousands of connections left
/// would otherwise pin their pages for as long as it sleeps. Costs one clock read per park.
pub fn on_worker_park() {
    #[cfg(feature = "jemalloc")]
    {
        use std::cell::Cell;
        use std::time::Instant;
        thread_local! {
            static LAST_FLUSH: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        let now = Instant::now();
        let due = LAST_FLUSH.with(|last| match last.get() {
            Some(at) if now.duration_since(at) < THREAD_CACHE_FLUSH_INTERVAL => false,
            _ => {
                last.set(Some(now));
                true
            }
        });
        if due {
            // Fails only when the thread has no cache (`_RJEM_MALLOC_CONF=tcache:false`).
            let _ = ws2http_jemalloc_conf::flush_thread_cache();
        }
    }
}

/// Why a profile could not be started, taken or written.
#[derive(Debug)]
pub enum ProfileError {
    /// pprof-rs could not start the CPU profiler or build its report.
    Cpu(pprof::Error),
    /// Heap profiling is not available or not active; the text says why.
    HeapUnavailable(&'static str),
    /// jemalloc refused a profiling request or its dump could not be converted.
    Heap(String),
    /// A heap profile is being taken for another request already.
    HeapBusy,
    /// The temporary directory takes no new file (heap dumps go through one there).
    TempDir {
        /// The directory ([`std::env::temp_dir`]).
        dir: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
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
            Self::HeapBusy => f.write_str("a heap profile is being taken already"),
            Self::TempDir { dir, source } => write!(
                f,
                "heap dumps go through a temporary file in {} (TMPDIR, else /tmp), and none \
                 can be made there: {source}",
                dir.display()
            ),
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
            Self::Write { source, .. } | Self::TempDir { source, .. } => Some(source),
            Self::HeapUnavailable(_) | Self::Heap(_) | Self::HeapBusy => None,
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
/// The CPU profiler's sample table takes about 170 MiB of resident memory from the start (pprof-rs
/// preallocates it), so memory figures taken while CPU-profiling are not comparable.
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
                .blocklist(cpu_blocklist(mem_profile.is_some()))
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
    /// Both profiles are attempted even if one fails; the first error is returned. Writes are
    /// held back ([`writes_finished`]) from the start, building the reports included (which
    /// can take seconds), so that a second signal meanwhile waits for them.
    pub fn finish(self) -> Result<(), ProfileError> {
        let writing = writes_finished();
        let cpu_result = match self.cpu {
            Some((guard, path)) => write_cpu_profile(&guard, &path, &writing),
            None => Ok(()),
        };
        let heap_result = match self.heap {
            Some(path) => heap::dump_blocking()
                .and_then(|profile| write_file(&path, &profile, &writing))
                .and(heap::deactivate()),
            None => Ok(()),
        };
        cpu_result.and(heap_result)
    }

    /// Stops profiling without writing anything (the gateway never started): a profile left
    /// by an earlier run at the same path stays as it was.
    pub fn discard(self) {
        if self.heap.is_some() {
            let _ = heap::deactivate();
        }
    }
}

/// A heap profile in pprof protobuf form (gzipped, for GET /debug/pprof/heap); Err when heap
/// profiling is not active.
pub async fn heap_profile() -> Result<Vec<u8>, ProfileError> {
    heap::dump().await
}

/// Shared objects in which an interrupted thread is not sampled.
///
/// The sampler unwinds from a signal handler. Samples in the unwinder itself (libgcc) or the vDSO
/// are never safe. libc is sampled when only the CPU profile runs: that is where a gateway's
/// syscalls are (read, write, epoll), and dropping those samples hid about half of the CPU time
/// of a flood run. With the heap profiler on, jemalloc unwinds (through libc's
/// `dl_iterate_phdr`) on sampled allocations, and a nested unwind there is not safe, so libc is
/// skipped then, as pprof-rs recommends.
fn cpu_blocklist(heap_profiling: bool) -> &'static [&'static str] {
    if heap_profiling {
        &["libc", "libgcc", "pthread", "vdso"]
    } else {
        &["libgcc", "pthread", "vdso"]
    }
}

/// CPU reports begun, for the tests (whether `finish` waits before it begins one).
#[cfg(test)]
static REPORTS_BEGUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Builds the CPU report and writes it: a flame graph for `*.svg`, else pprof protobuf.
fn write_cpu_profile(
    guard: &pprof::ProfilerGuard<'static>,
    path: &Path,
    writing: &Writing,
) -> Result<(), ProfileError> {
    #[cfg(test)]
    REPORTS_BEGUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
    write_file(path, &bytes, writing)
}

/// How many names [`create_beside`] tries before it gives up: `FILE.<pid>.<kind>`, then
/// `FILE.<pid>.1.<kind>` and so on.
const NAMES_BESIDE: usize = 16;

/// The `attempt`th name for a file of this process's own beside `path`, of the given `kind`
/// (`partial`, `check`).
fn path_beside(path: &Path, kind: &str, attempt: usize) -> PathBuf {
    let mut beside = path.as_os_str().to_owned();
    if attempt == 0 {
        beside.push(format!(".{}.{kind}", std::process::id()));
    } else {
        beside.push(format!(".{}.{attempt}.{kind}", std::process::id()));
    }
    PathBuf::from(beside)
}

/// Where a profile for `path` is first tried before it is renamed into place.
#[cfg(test)]
fn partial_path(path: &Path) -> PathBuf {
    path_beside(path, "partial", 0)
}

/// Creates a new file beside `path` (never opening one already there: a user's file, a link,
/// or one left by a run killed while it wrote, which in a container may have had the same
/// pid): the first free one of [`NAMES_BESIDE`] names ([`path_beside`]).
fn create_beside(path: &Path, kind: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut taken = None;
    for attempt in 0..NAMES_BESIDE {
        let beside = path_beside(path, kind, attempt);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&beside)
        {
            Ok(file) => return Ok((beside, file)),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => taken = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(taken.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

/// Checks at start-up that a profile can be written at `path`, so that a run's profile is
/// not lost at its end, and that writing it replaces nothing but a profile:
///
/// - `path`, if it is there, is a regular file: the profile is renamed over it at shutdown,
///   which would replace a device such as `/dev/null`, a FIFO or a socket, or a symbolic link
///   (`/dev/stdout` is one), whatever it points to: the link itself, not its target, would
///   be replaced, which is never what was meant;
/// - its directory exists and takes new files: a new file of this process's own is created
///   beside it (never opening one that exists) and removed;
/// - the directory will let it be replaced: in a sticky directory (`/tmp`) only the owner of
///   the file or of the directory (or root) may ([`sticky_refuses_replacing`]).
pub fn check_writable(path: &Path) -> Result<(), ProfileError> {
    use std::os::unix::fs::MetadataExt as _;
    let refused = |source| ProfileError::Write {
        path: path.to_owned(),
        source,
    };
    // A directory would take the probe beside it but never the profile itself.
    if path.file_name().is_none() {
        return Err(refused(std::io::ErrorKind::IsADirectory.into()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(there) if there.is_symlink() => {
            return Err(refused(std::io::Error::other(format!(
                "it is a symbolic link (to {}), which the profile would replace: give the \
                 path of the file itself",
                std::fs::read_link(path)
                    .map(|target| target.display().to_string())
                    .unwrap_or_else(|_| "?".to_owned())
            ))))
        }
        Ok(there) if there.is_dir() => {
            return Err(refused(std::io::ErrorKind::IsADirectory.into()))
        }
        Ok(there) if !there.is_file() => {
            return Err(refused(std::io::Error::other(format!(
                "it is {}, not a regular file, and the profile would replace it",
                file_kind(&there.file_type())
            ))))
        }
        // A regular file: a profile, to be replaced.
        Ok(_) => {}
        // Nothing there.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(refused(error)),
    }
    // The probe's owner is who the kernel checks a rename against (the file system uid).
    let writer = create_beside(path, "check")
        .and_then(|(probe, file)| {
            let owner = file.metadata()?.uid();
            std::fs::remove_file(probe)?;
            Ok(owner)
        })
        .map_err(refused)?;
    // The file the rename replaces, if there is one.
    let Ok(there) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir_meta = std::fs::metadata(dir).map_err(refused)?;
    if sticky_refuses_replacing(dir_meta.mode(), dir_meta.uid(), there.uid(), writer) {
        return Err(refused(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "it belongs to another user (uid {}) in a sticky directory ({}), which would \
                 refuse to let the profile replace it",
                there.uid(),
                dir.display()
            ),
        )));
    }
    Ok(())
}

/// Whether a directory with `dir_mode` owned by `dir_uid` refuses a rename by `writer` (a
/// uid; 0 is root) over a file owned by `file_uid` that is there: a sticky directory (mode
/// `1000`, as `/tmp`'s `1777`) lets only the owner of the file or of the directory replace it.
fn sticky_refuses_replacing(dir_mode: u32, dir_uid: u32, file_uid: u32, writer: u32) -> bool {
    const STICKY: u32 = 0o1000;
    dir_mode & STICKY != 0 && writer != 0 && writer != file_uid && writer != dir_uid
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

/// Checks at start-up that heap dumps can be taken: jemalloc writes each one into a new
/// temporary file in [`std::env::temp_dir`] (`TMPDIR`, else `/tmp`), and without one both
/// `GET /debug/pprof/heap` and the profile at shutdown would fail. Creates a file of its own
/// there and removes it.
pub fn check_heap_temp_dir() -> Result<(), ProfileError> {
    let dir = std::env::temp_dir();
    create_beside(&dir.join("ws2http-heap"), "check")
        .and_then(|(probe, _)| std::fs::remove_file(probe))
        .map_err(|source| ProfileError::TempDir { dir, source })
}

/// Held while profiles are built, written and renamed into place.
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Proof that [`WRITING`] is held.
type Writing = std::sync::MutexGuard<'static, ()>;

/// Waits until a profile file being written is in place, and holds back any other write for
/// as long as the returned guard lives: for a process about to exit at once (a second
/// Ctrl-C), which then leaves neither a file cut short nor a stray `<path>.partial`.
pub fn writes_finished() -> std::sync::MutexGuard<'static, ()> {
    WRITING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `bytes` to `path` at once: into a new partial file beside it ([`create_beside`]),
/// then renamed, so that a process stopped mid-write (by SIGKILL) leaves the file as it was,
/// not cut short. The error names the file. Only a partial file this call created is removed
/// on an error.
fn write_file(path: &Path, bytes: &[u8], _writing: &Writing) -> Result<(), ProfileError> {
    use std::io::Write as _;
    let error = |source| ProfileError::Write {
        path: path.to_owned(),
        source,
    };
    let (partial, mut file) = create_beside(path, "partial").map_err(error)?;
    file.write_all(bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&partial);
            error(source)
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
        // One dump at a time, and none queued behind it: each takes a temporary file and
        // seconds of symbolizing.
        let mut guard = ctl.try_lock_owned().map_err(|_| ProfileError::HeapBusy)?;
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use pprof::protos::{Message, Profile};

    use super::*;

    /// pprof-rs's CPU profiler and jemalloc's heap profiler are process-wide.
    static PROFILERS: Mutex<()> = Mutex::new(());

    /// An empty directory of its own in the temporary directory (one left by an earlier run
    /// is emptied).
    fn empty_temp_dir(name: &str) -> PathBuf {
        let dir = temp_path(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A fresh path in the temporary directory.
    fn temp_path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ws2http-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_profile_path_in_a_missing_directory_is_refused_at_start() {
        let missing = temp_path("no-such-dir").join("cpu.pb");
        let error = check_writable(&missing).unwrap_err().to_string();
        assert!(error.contains("cpu.pb"), "{error}");
        let dir = empty_temp_dir("checked");
        // A FILE.partial already there (left by a stopped run, or a user's) is not opened.
        let fine = dir.join("cpu.pb");
        std::fs::write(partial_path(&fine), b"kept").unwrap();
        check_writable(&fine).unwrap();
        assert_eq!(std::fs::read(partial_path(&fine)).unwrap(), b"kept");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [partial_path(&fine).file_name().unwrap()],
            "nothing else left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_profile_path_that_is_a_directory_is_refused_at_start() {
        let dir = empty_temp_dir("a-directory");
        for path in [dir.clone(), PathBuf::from(format!("{}/", dir.display()))] {
            let error = check_writable(&path).unwrap_err().to_string();
            assert!(error.contains("a-directory"), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_profile_path_that_is_there_and_not_a_regular_file_is_refused_at_start() {
        let dir = empty_temp_dir("not-regular");
        let socket = dir.join("a-socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let to_null = dir.join("to-null");
        std::os::unix::fs::symlink("/dev/null", &to_null).unwrap();
        // A link to a regular file, or to nothing, would be replaced itself, not its target
        // (as `/dev/stdout` would, though its output goes to a file).
        let file = dir.join("a-file");
        std::fs::write(&file, b"kept").unwrap();
        let to_file = dir.join("to-file");
        std::os::unix::fs::symlink(&file, &to_file).unwrap();
        let to_nothing = dir.join("to-nothing");
        std::os::unix::fs::symlink(dir.join("nothing"), &to_nothing).unwrap();
        for (path, kind) in [
            (Path::new("/dev/null"), "a character device"),
            (&socket, "a socket"),
            (&to_null, "a symbolic link (to /dev/null)"),
            (&to_file, "a symbolic link"),
            (&to_nothing, "a symbolic link"),
        ] {
            let error = check_writable(path).unwrap_err().to_string();
            assert!(
                error.contains(&path.display().to_string()) && error.contains(kind),
                "{error}"
            );
        }
        // A regular file (an earlier profile), or nothing: taken.
        for path in [&file, &dir.join("new")] {
            check_writable(path).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sticky_directory_refuses_replacing_only_another_user_s_file_to_anyone_but_root() {
        const TMP: u32 = 0o041_777; // a directory, rwxrwxrwt
        const PLAIN: u32 = 0o040_777;
        let (root, dir_owner, file_owner, other) = (0, 10, 20, 30);
        assert!(sticky_refuses_replacing(TMP, dir_owner, file_owner, other));
        // The file's owner, the directory's owner, and root may; and anyone, without the bit.
        for writer in [file_owner, dir_owner, root] {
            assert!(!sticky_refuses_replacing(
                TMP, dir_owner, file_owner, writer
            ));
        }
        assert!(!sticky_refuses_replacing(
            PLAIN, dir_owner, file_owner, other
        ));
    }

    #[test]
    fn a_profile_path_of_one_s_own_in_a_sticky_directory_is_taken() {
        // The temporary directory is usually sticky; a file the test made is its own.
        let path = temp_path("own-in-tmp.pb");
        std::fs::write(&path, b"mine").unwrap();
        check_writable(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_profile_is_written_through_a_new_file_never_one_already_there() {
        let dir = empty_temp_dir("partial-link");
        let path = dir.join("cpu.pb");
        // A link where the partial file goes first, to a file that must not be overwritten,
        // and a partial file left by a killed run of the same pid (a container's PID 1).
        let victim = dir.join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        std::os::unix::fs::symlink(&victim, partial_path(&path)).unwrap();
        std::fs::write(path_beside(&path, "partial", 1), b"left").unwrap();
        write_file(&path, b"profile", &writes_finished()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"profile");
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        // Both are left as they were: neither was this write's to remove.
        assert!(partial_path(&path).is_symlink());
        assert_eq!(
            std::fs::read(path_beside(&path, "partial", 1)).unwrap(),
            b"left"
        );
        assert!(!path_beside(&path, "partial", 2).exists(), "renamed away");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_profile_write_with_every_partial_name_taken_fails_naming_the_file_and_removes_none() {
        let dir = empty_temp_dir("partial-all-taken");
        let path = dir.join("heap.pb.gz");
        for attempt in 0..NAMES_BESIDE {
            std::fs::write(path_beside(&path, "partial", attempt), b"left").unwrap();
        }
        let error = write_file(&path, b"profile", &writes_finished()).unwrap_err();
        assert!(error.to_string().contains("heap.pb.gz"), "{error}");
        assert!(!path.exists());
        for attempt in 0..NAMES_BESIDE {
            assert_eq!(
                std::fs::read(path_beside(&path, "partial", attempt)).unwrap(),
                b"left"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finishing_the_profiles_builds_nothing_while_an_exit_holds_writes_back() {
        let _serial = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let path = temp_path("held-back.pb");
        let partial = partial_path(&path);
        let guard = start(Some(path.clone()), None).unwrap();
        busy_loop_for_profile(Duration::from_millis(50));
        let begun = REPORTS_BEGUN.load(Ordering::SeqCst);
        // An exit (a second signal) holds writes back: finish() must not even begin a report,
        // or the exit would come in the middle of it.
        let held = writes_finished();
        let finisher = std::thread::spawn(move || guard.finish());
        // Nothing tells that finish() is waiting on the held writes, so this waits a fixed
        // 200 ms: a report begun at once would be counted within microseconds.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            REPORTS_BEGUN.load(Ordering::SeqCst),
            begun,
            "a report was begun while writes were held back"
        );
        assert!(!path.exists() && !partial.exists());
        drop(held);
        finisher.join().unwrap().unwrap();
        assert!(path.exists() && !partial.exists());
        let _ = std::fs::remove_file(&path);
    }

    /// Burns CPU for `duration` in a frame with a recognisable name.
    #[inline(never)]
    fn busy_loop_for_profile(duration: Duration) -> u64 {
        let start = Instant::now();
        let mut x = 1u64;
        while start.elapsed() < duration {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        }
        x
    }

    /// The names of all functions in a decoded pprof profile.
    fn function_names(profile: &Profile) -> Vec<&str> {
        profile
            .function
            .iter()
            .filter_map(|f| usize::try_from(f.name).ok())
            .filter_map(|i| profile.string_table.get(i))
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn cpu_profile_of_a_busy_loop_decodes_with_its_samples() {
        let _serial = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let path = temp_path("cpu.pb");
        let guard = start(Some(path.clone()), None).unwrap();
        busy_loop_for_profile(Duration::from_millis(400));
        guard.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let profile = Profile::decode(bytes.as_slice()).unwrap();
        assert!(!profile.sample.is_empty(), "no samples in the profile");
        let sample_types: Vec<&str> = profile
            .sample_type
            .iter()
            .map(|t| profile.string_table[usize::try_from(t.ty).unwrap()].as_str())
            .collect();
        assert_eq!(sample_types, ["samples", "cpu"]);
        let names = function_names(&profile);
        assert!(
            names.iter().any(|n| n.contains("busy_loop_for_profile")),
            "busy loop not among the profiled functions: {names:?}"
        );
    }

    #[test]
    fn cpu_profile_named_svg_is_a_flame_graph() {
        let _serial = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let path = temp_path("cpu.svg");
        let guard = start(Some(path.clone()), None).unwrap();
        busy_loop_for_profile(Duration::from_millis(200));
        guard.finish().unwrap();

        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.contains("<svg"),
            "not an SVG: {}",
            &svg[..svg.len().min(200)]
        );
        assert!(svg.contains("busy_loop_for_profile"));
    }

    #[test]
    fn unwritable_profile_file_is_an_error_naming_it() {
        let _serial = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let path = temp_path("no-such-dir").join("cpu.pb");
        let guard = start(Some(path.clone()), None).unwrap();
        let error = guard.finish().unwrap_err();
        assert!(matches!(error, ProfileError::Write { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn libc_is_sampled_unless_the_heap_profiler_unwinds_too() {
        assert!(!cpu_blocklist(false).contains(&"libc"));
        assert!(cpu_blocklist(true).contains(&"libc"));
        for heap in [false, true] {
            assert!(cpu_blocklist(heap).contains(&"libgcc"));
        }
    }

    #[test]
    fn a_discarded_profile_leaves_an_earlier_one_in_place() {
        let _profilers = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let path = temp_path("discarded-cpu.pb");
        std::fs::write(&path, b"an earlier run's profile").unwrap();
        let guard = start(Some(path.clone()), None).unwrap();
        guard.discard();
        assert_eq!(std::fs::read(&path).unwrap(), b"an earlier run's profile");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_profile_is_written_whole_with_nothing_left_beside_it() {
        let dir = empty_temp_dir("written-whole");
        let path = dir.join("cpu.pb");
        std::fs::write(&path, b"an earlier run's profile").unwrap();
        write_file(&path, b"the new one", &writes_finished()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the new one");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cpu.pb"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_profiles_asked_for_writes_nothing() {
        let guard = start(None, None).unwrap();
        assert!(guard.cpu.is_none() && guard.heap.is_none());
        guard.finish().unwrap();
    }

    /// Allocates `bytes` (a frame of its own, for reading the profile by hand).
    #[cfg(feature = "jemalloc")]
    #[inline(never)]
    fn allocate_for_heap_profile(bytes: usize) -> Vec<u8> {
        std::hint::black_box(vec![1u8; bytes])
    }

    /// Decodes a gzipped pprof profile.
    #[cfg(feature = "jemalloc")]
    fn decode_gzipped(bytes: &[u8]) -> Profile {
        use std::io::Read;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        Profile::decode(raw.as_slice()).unwrap()
    }

    #[cfg(feature = "jemalloc")]
    #[test]
    fn heap_profile_is_available_only_with_memprofile_and_shows_live_allocations() {
        let _serial = PROFILERS.lock().unwrap_or_else(|e| e.into_inner());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(heap_profile_scenario());
    }

    /// The body of the heap profile test, in the async context the control listener calls from.
    #[cfg(feature = "jemalloc")]
    async fn heap_profile_scenario() {
        let before = heap_profile().await.unwrap_err();
        assert!(
            matches!(before, ProfileError::HeapUnavailable(_)),
            "{before}"
        );

        let path = temp_path("heap.pb.gz");
        let guard = start(None, Some(path.clone())).unwrap();
        const SIZE: usize = 32 << 20;
        let kept = allocate_for_heap_profile(SIZE);

        let profile = decode_gzipped(&heap_profile().await.unwrap());
        let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
        assert!(total >= SIZE as i64, "in-use bytes {total} < {SIZE}");
        // Addresses only (the reader symbolizes), mapped to this executable.
        assert!(profile.location.iter().any(|l| l.address != 0));
        let exe = std::env::current_exe().unwrap();
        let exe_name = exe.file_name().unwrap().to_string_lossy();
        assert!(
            profile.mapping.iter().any(|m| {
                usize::try_from(m.filename)
                    .ok()
                    .and_then(|i| profile.string_table.get(i))
                    .is_some_and(|f| f.ends_with(exe_name.as_ref()))
            }),
            "no mapping for {exe_name}"
        );

        // While a dump runs, another request is told so at once, not queued behind it.
        {
            let _dumping = jemalloc_pprof::PROF_CTL.as_ref().unwrap().lock().await;
            let busy = heap_profile().await.unwrap_err();
            assert!(matches!(busy, ProfileError::HeapBusy), "{busy}");
        }

        guard.finish().unwrap();
        drop(kept);
        let written = decode_gzipped(&std::fs::read(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        assert!(!written.sample.is_empty());
        // finish() switched the profiler off again.
        assert!(heap_profile().await.is_err());
    }

    #[cfg(not(feature = "jemalloc"))]
    #[test]
    fn memprofile_without_jemalloc_is_an_error() {
        let error = start(None, Some(temp_path("heap"))).unwrap_err();
        assert!(matches!(error, ProfileError::HeapUnavailable(_)), "{error}");
    }
}
