//! `ferry`: move very large container images (and any file or directory)
//! between CI stages as deduplicated, content-addressed chunks.
//!
//! This binary is glue: parse the command line, call one library function,
//! render the result. Exit codes are mapped in one place (`main`).

mod bench;
mod output;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// No progress or summary output; errors still go to stderr.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmark the chunking core on this machine (no cargo needed).
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(cli.json, cli.quiet);
    let result = match cli.command {
        Command::Bench(args) => bench::run(args, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`ferry unstash x - | head`) is not a failure.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("ferry: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
