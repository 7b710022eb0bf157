//! The `cardgate` binary: parses the command line and runs it.

#![forbid(unsafe_code)]

/// mimalloc instead of the C library's allocator: requests allocate and free small buffers on
/// two threads at once, where glibc's arenas spent about a tenth of the gateway's CPU time
/// (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cardgate::allocator::tune();
    cardgate::cli::main()
}
