//! The `cardgate` binary: parses the command line and runs it.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cardgate::cli::main()
}
