//! The memory allocator's settings for a long-running gateway.
//!
//! The `cardgate` binary (and the load harness, so its in-process servers run as the daemon
//! does) allocates through mimalloc. By default mimalloc keeps memory freed by a thread for
//! a second before it gives it back and commits arenas eagerly; under
//! load, with request buffers freed on one thread and memtables or pages freed on another,
//! the daemon's resident memory peaked well above what it holds (docs/BENCHMARKS.md, issue
//! #15). [`tune`] has freed memory go back to the system after 100 ms and arenas commit as
//! they are used. (At once, 0 ms, held a little less but cost about 2% of the CPU: Ed25519
//! batches allocate their tables afresh, and each fresh huge page is zeroed by the kernel.) An operator's own `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ARENA_EAGER_COMMIT` in the
//! environment wins.

/// mimalloc's option numbers (`mi_option_t` in mimalloc 3's `mimalloc.h`, the version
/// `libmimalloc-sys` builds: it names few of them as constants).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// What [`tune`] sets, each unless the environment names it: (variable, option, value).
const SETTINGS: [(&str, libmimalloc_sys::mi_option_t, std::ffi::c_long); 2] =
    [("MIMALLOC_PURGE_DELAY", PURGE_DELAY, 100), ("MIMALLOC_ARENA_EAGER_COMMIT", ARENA_EAGER_COMMIT, 0)];

/// Sets mimalloc's options for the daemon; call first thing in `main`, before any thread is
/// started (mimalloc's option setters are not thread-safe). Harmless where another global
/// allocator is in use: the options are mimalloc's alone.
pub fn tune() {
    for (variable, option, value) in SETTINGS {
        if std::env::var_os(variable).is_some() {
            continue;
        }
        // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; the option
        // numbers are those of the linked mimalloc version (checked in the test below), and
        // this runs before the process starts other threads.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(option, value);
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

    #[test]
    fn the_option_numbers_are_the_linked_mimallocs() {
        // Defaults of mimalloc 3 (`src/options.c`): eager commit of arenas 2 (on
        // overcommitting systems), purge delay 1,000 ms. A renumbered option would read something else here.
        // (Read before `tune` in this process: the test binary does not call it.)
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(PURGE_DELAY), 1000);
        }
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            assert_eq!(get(ARENA_EAGER_COMMIT), 2);
        }
    }
}
