//! The memory allocator's settings for a long-running gateway.
//!
//! The `cardgate` binary (and the load harness, so its in-process servers run as the daemon
//! does) allocates through mimalloc. By default mimalloc keeps memory freed by a thread for
//! a second before it gives it back and commits arenas eagerly; under
//! load, with request buffers freed on one thread and memtables or pages freed on another,
//! the daemon's resident memory peaked well above what it holds (docs/BENCHMARKS.md, issue
//! #15). [`tune`] has freed memory go back to the system after 100 ms and arenas commit as
//! they are used. (At once, 0 ms, held a little less but cost about 2% of the CPU: Ed25519
//! batches allocate their tables afresh, and each fresh huge page is zeroed by the kernel.)
//!
//! It also turns transparent huge pages off for the process. mimalloc asks the kernel for
//! them on its arenas (`madvise(MADV_HUGEPAGE)`), so the first touch of a purged 2 MiB range
//! faults in and zeroes a whole huge page — for an Ed25519 batch's tables of a few hundred
//! KiB, or a request's buffers — and the resident figure counts every huge page whole. With
//! 4 KiB pages the daemon's peak with 1,000 connections settling fell by a fifth (SQLite
//! 117-124 -> 94 MiB, lsm 230-235 -> 200 MiB) and the kernel's page zeroing (3.4% of the
//! CPU) went; throughput stayed within the machine's spread (docs/BENCHMARKS.md).
//!
//! An operator's own `MIMALLOC_PURGE_DELAY`, `MIMALLOC_ARENA_EAGER_COMMIT` or
//! `MIMALLOC_ALLOW_THP` in the environment wins (mimalloc itself reads them).

/// mimalloc's option numbers (`mi_option_t` in mimalloc 3's `mimalloc.h`, the version
/// `libmimalloc-sys` builds: it names few of them as constants).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// What [`tune`] sets, each unless the environment names it: (variable, option, value).
const SETTINGS: [(&str, libmimalloc_sys::mi_option_t, std::ffi::c_long); 3] = [
    ("MIMALLOC_PURGE_DELAY", PURGE_DELAY, 100),
    ("MIMALLOC_ARENA_EAGER_COMMIT", ARENA_EAGER_COMMIT, 0),
    ("MIMALLOC_ALLOW_THP", ALLOW_THP, 0),
];

/// Sets mimalloc's options for the daemon; call first thing in `main`, before any thread is
/// started (mimalloc's option setters are not thread-safe). Harmless where another global
/// allocator is in use: the options are mimalloc's alone.
pub fn tune() {
    tune_unless(|variable| std::env::var_os(variable).is_some());
}

/// [`tune`], leaving alone each option whose variable `set` says the environment names.
fn tune_unless(set: impl Fn(&str) -> bool) {
    for (variable, option, value) in SETTINGS {
        if set(variable) {
            continue;
        }
        // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; the option
        // numbers are those of the linked mimalloc version (checked in the test below), and
        // this runs before the process starts other threads.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(option, value);
        }
        if option == ALLOW_THP {
            // mimalloc no longer asks for huge pages on the arenas it maps from now on; the
            // process's flag also covers what it mapped before `main` and a kernel whose
            // setting is `always` (mimalloc sets it so at its start only when the variable
            // says 0). Where the kernel refuses (no THP support), there is nothing to turn off.
            #[cfg(target_os = "linux")]
            let _ = rustix::thread::disable_transparent_huge_pages(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value mimalloc holds for `option`.
    fn get(option: libmimalloc_sys::mi_option_t) -> std::ffi::c_long {
        // SAFETY: reads an integer from mimalloc's option table.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_get(option)
        }
    }

    /// One test, in order, since the options are the process's: the numbers are the linked
    /// mimalloc's, a variable in the environment keeps its option, the others are set.
    #[test]
    fn tune_sets_the_linked_mimallocs_options_unless_the_environment_names_them() {
        let from_environment = |v: &str| std::env::var_os(v).is_some();
        if SETTINGS.iter().any(|(variable, ..)| from_environment(variable)) {
            return; // The defaults below are not what this process started with.
        }
        // Defaults of mimalloc 3 (`src/options.c`): eager commit of arenas 2 (on
        // overcommitting systems), purge delay 1,000 ms, huge pages allowed. A renumbered
        // option would read something else here. (Nothing in this test binary calls `tune`.)
        assert_eq!(get(PURGE_DELAY), 1000);
        assert_eq!(get(ARENA_EAGER_COMMIT), 2);
        assert_eq!(get(ALLOW_THP), 1);
        // The operator named the purge delay: only the other settings change.
        tune_unless(|v| v == "MIMALLOC_PURGE_DELAY");
        assert_eq!(get(PURGE_DELAY), 1000);
        assert_eq!(get(ARENA_EAGER_COMMIT), 0);
        assert_eq!(get(ALLOW_THP), 0);
        // None named: all set.
        tune_unless(|_| false);
        assert_eq!(get(PURGE_DELAY), 100);
        assert_eq!(get(ARENA_EAGER_COMMIT), 0);
        #[cfg(target_os = "linux")]
        if let Ok(disabled) = rustix::thread::transparent_huge_pages_are_disabled() {
            assert!(disabled, "the process's huge pages are off");
        }
    }
}
