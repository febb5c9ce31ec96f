use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    airlock::cli::main(airlock::cli::Cli::parse())
}
