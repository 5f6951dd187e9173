//! `tenet`: the operator and controller command line.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
