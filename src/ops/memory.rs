//! The process's memory: maps the executable in at start-up, and gives freed heap back
//! to the kernel once a minute.
//!
//! Without the first, the kernel faults the binary's pages in as each code path first runs:
//! the first TLS handshake, the first TCP allocation, the first error reply each take page
//! faults (a disk read on a cold page cache) on the thread serving that client, and the
//! resident set creeps up for the first twenty minutes of a soak (12.5 MiB of file pages,
//! measured with `bench/soak.sh`) so a leak cannot be told from warm-up. Populating the
//! mappings once at start makes both go away; the pages are the page cache's (shared,
//! reclaimable under pressure), so it costs no anonymous memory.
//!
//! Without the second, glibc keeps freed chunks inside its per-thread arenas: after a burst
//! of signaling or HTTP connections the resident set stays at the burst's high-water mark
//! (in the soak, arenas held 4.8 MB for 2.1 MB in use). `malloc_trim` returns the free
//! pages; once a minute costs a few milliseconds on the daemon's main thread, never on a
//! worker's data path (which does not allocate).
//!
//! Must not fail the start: any error is returned for one log line and the daemon runs as
//! before.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One mapping of the executable, from `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
}

/// The mappings in `maps` (the text of `/proc/self/maps`) backed by the file `exe`.
fn exe_mappings(maps: &str, exe: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            // "start-end perms offset dev inode   path"
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if path != exe || !perms.starts_with('r') {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            let start = usize::from_str_radix(s, 16).ok()?;
            let end = usize::from_str_radix(e, 16).ok()?;
            (end > start).then_some(Mapping { start, end })
        })
        .collect()
}

/// Populates every readable mapping of the running executable (Linux 5.14
/// `MADV_POPULATE_READ`; on older kernels, one read per page). Returns the bytes covered.
pub fn map_in() -> io::Result<usize> {
    let exe: PathBuf = std::fs::read_link("/proc/self/exe")?;
    let exe = exe
        .to_str()
        .ok_or_else(|| io::Error::other("executable path is not UTF-8"))?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mappings = exe_mappings(&maps, exe);
    if mappings.is_empty() {
        return Err(io::Error::other("no mapping of the executable found"));
    }
    let mut bytes = 0;
    for m in &mappings {
        let len = m.end - m.start;
        // SAFETY: the range is one of this process's own readable mappings, as listed by the
        // kernel; MADV_POPULATE_READ only faults pages in, it changes no contents.
        let r =
            unsafe { libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_POPULATE_READ) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            touch_pages(m.start, m.end);
        }
        bytes += len;
    }
    Ok(bytes)
}

/// Reads one byte per page (kernels before 5.14 reject `MADV_POPULATE_READ` with EINVAL).
fn touch_pages(start: usize, end: usize) {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    };
    let mut at = start;
    while at < end {
        // SAFETY: `at` lies in a readable mapping of this process (see `map_in`).
        unsafe { std::ptr::read_volatile(at as *const u8) };
        at += page;
    }
}

/// How often [`HeapTrim`] gives memory back.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Gives the heap's free pages back to the kernel every [`TRIM_EVERY`] (glibc's
/// `malloc_trim`; other C libraries: nothing to do).
#[derive(Debug)]
pub struct HeapTrim {
    next: Instant,
}

impl HeapTrim {
    pub fn new(now: Instant) -> Self {
        Self {
            next: now + TRIM_EVERY,
        }
    }

    /// Called from the daemon's main loop; trims when a minute has passed.
    pub fn tick(&mut self, now: Instant) {
        if now >= self.next {
            self.next = now + TRIM_EVERY;
            trim_heap();
        }
    }
}

/// Returns free heap pages to the kernel, in every arena.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory malloc holds free; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/tern
55d0c0100000-55d0c0900000 r-xp 00100000 fd:01 123 /usr/bin/tern
55d0c0900000-55d0c0a00000 rw-p 00900000 fd:01 123 /usr/bin/tern
55d0c0a00000-55d0c0a01000 ---p 00a00000 fd:01 123 /usr/bin/tern
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000201000 r-xp 00000000 fd:01 789 /usr/bin/tern-other
";

    #[test]
    fn only_the_executables_readable_mappings_are_chosen() {
        let m = exe_mappings(MAPS, "/usr/bin/tern");
        assert_eq!(
            m,
            vec![
                Mapping {
                    start: 0x55d0c0000000,
                    end: 0x55d0c0100000
                },
                Mapping {
                    start: 0x55d0c0100000,
                    end: 0x55d0c0900000
                },
                Mapping {
                    start: 0x55d0c0900000,
                    end: 0x55d0c0a00000
                },
            ]
        );
        assert!(exe_mappings("garbage\n\n-\n", "/usr/bin/tern").is_empty());
    }

    /// A field of /proc/self/status, KiB.
    fn status_kib(field: &str) -> usize {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok())
            .unwrap()
    }

    #[test]
    fn mapping_in_makes_the_test_binary_resident() {
        let file_rss = || status_kib("RssFile:");
        let before = file_rss();
        let bytes = map_in().expect("map_in");
        let after = file_rss();
        // The test binary's code is several MiB, most of it never run by this test.
        assert!(bytes > 1 << 20, "{bytes}");
        assert!(after >= before, "{before} -> {after}");
        assert!(
            after * 1024 >= bytes / 2,
            "RssFile {after} KiB after mapping {bytes} bytes in"
        );
    }

    #[test]
    #[cfg(target_env = "gnu")]
    fn trimming_gives_freed_heap_back() {
        // On a thread of its own (its own arena): 64 MiB in 4 KiB blocks, all freed but the
        // last, which pins the arena's top so glibc cannot shrink it from the end.
        std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..16384).map(|i| vec![i as u8; 4096]).collect();
            let last = blocks.pop().unwrap();
            drop(blocks);
            let before = status_kib("RssAnon:");
            trim_heap();
            let after = status_kib("RssAnon:");
            assert_eq!(last[0], (16383 % 256) as u8);
            // Other tests run beside this one: a margin of half the freed memory.
            assert!(
                after + 32 * 1024 < before,
                "RssAnon {before} KiB -> {after} KiB after trim"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn trims_once_a_minute() {
        let t0 = Instant::now();
        let mut t = HeapTrim::new(t0);
        t.tick(t0 + Duration::from_secs(59));
        assert_eq!(t.next, t0 + TRIM_EVERY);
        t.tick(t0 + Duration::from_secs(61));
        assert_eq!(t.next, t0 + Duration::from_secs(121));
    }
}
