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
//! An operator's own `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ARENA_EAGER_COMMIT` in the
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
        if from_environment("MIMALLOC_PURGE_DELAY") || from_environment("MIMALLOC_ARENA_EAGER_COMMIT") {
            return; // The defaults below are not what this process started with.
        }
        // Defaults of mimalloc 3 (`src/options.c`): eager commit of arenas 2 (on
        // overcommitting systems), purge delay 1,000 ms. A renumbered option would read
        // something else here. (Nothing in this test binary calls `tune`.)
        assert_eq!(get(PURGE_DELAY), 1000);
        assert_eq!(get(ARENA_EAGER_COMMIT), 2);
        // The operator named the purge delay: only the arenas' setting changes.
        tune_unless(|v| v == "MIMALLOC_PURGE_DELAY");
        assert_eq!(get(PURGE_DELAY), 1000);
        assert_eq!(get(ARENA_EAGER_COMMIT), 0);
        // Neither named: both set.
        tune_unless(|_| false);
        assert_eq!(get(PURGE_DELAY), 100);
        assert_eq!(get(ARENA_EAGER_COMMIT), 0);
    }
}
