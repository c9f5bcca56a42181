//! `ferry`: move very large container images (and any file or directory)
//! between CI stages as deduplicated, content-addressed chunks.
//!
//! This binary is glue: parse the command line, call one library function,
//! render the result. Exit codes are mapped in one place (`main`).

mod bench;
mod commands;
mod demo;
mod gc;
mod interrupt;
mod malloc;
mod output;
mod progress;
mod remote;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Move container images, files and directories between CI stages as deduplicated chunks",
    long_about = None,
    propagate_version = true,
    after_help = "Examples:\n  docker save img | ferry stash main/ci_gpu -\n  ferry unstash main/ci_gpu - | docker load\n  ferry demo        # a guided first run\n\nThe store is --store DIR, else $FERRY_STORE, else ~/.cache/ferry. Packs are\nwritten with O_DIRECT, past the page cache; FERRY_DIRECT_IO=0 writes them\nbuffered."
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// No progress or summary output; errors still go to stderr.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(flatten)]
    store: commands::StoreArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stash a file, a directory or standard input under a name.
    #[command(long_about = commands::STASH_ABOUT)]
    Stash(commands::StashArgs),
    /// Restore a stash to a file, a directory or standard output.
    #[command(long_about = commands::UNSTASH_ABOUT)]
    Unstash(commands::UnstashArgs),
    /// List stashes, optionally under a prefix.
    #[command(after_help = "Examples:\n  ferry ls\n  ferry ls pr/1234\n  ferry ls main --json")]
    Ls(commands::LsArgs),
    /// Show a stash: kind, size, SHA-256, chunks, dedup; tags and layers for images.
    #[command(
        after_help = "Examples:\n  ferry inspect main/ci_gpu\n  ferry inspect main/ci_gpu --json | jq .image.layers"
    )]
    Inspect(commands::InspectArgs),
    /// Remove names or a prefix, locally or on the server (their data goes
    /// when nothing else uses it).
    Rm(commands::RmArgs),
    /// Logical versus stored size of the store, and what no name uses.
    #[command(after_help = "Example:\n  ferry du\n  ferry --store /mnt/ferry du --json")]
    Du,
    /// Check the store's structure and index; --full re-hashes every chunk.
    #[command(
        after_help = "Exit status: 0 healthy, 1 problems found (each is printed), 2 the check could not run.\n\nExamples:\n  ferry fsck\n  ferry fsck --full"
    )]
    Fsck(commands::FsckArgs),
    /// Apply retention policies and delete what no name uses (safe beside running stashes).
    #[command(long_about = gc::LONG_ABOUT)]
    Gc(gc::Args),
    /// A guided first run: stash an image, change it, stash again, restore.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::Args),
    /// Benchmark the chunking core on this machine (no cargo needed).
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::Args),
    /// Share a store with CI nodes over QUIC (for --remote).
    #[command(long_about = serve::LONG_ABOUT)]
    Serve(serve::Args),
}

fn main() -> ExitCode {
    // Before any thread starts; a refusal only costs speed.
    malloc::tune();
    let cli = Cli::parse();
    let out = output::Output::new(cli.json, cli.quiet);
    if !matches!(cli.command, Command::Serve(_)) {
        // `serve` shuts down on these signals in its own way.
        interrupt::install();
    }
    let result = match cli.command {
        Command::Stash(args) => commands::stash(&cli.store, args, &out),
        Command::Unstash(args) => commands::unstash(&cli.store, args, &out),
        Command::Ls(args) => commands::ls(&cli.store, args, &out),
        Command::Inspect(args) => commands::inspect(&cli.store, args, &out),
        Command::Rm(args) => commands::rm(&cli.store, args, &out),
        Command::Du => commands::du(&cli.store, &out),
        Command::Fsck(args) => commands::fsck(&cli.store, args, &out),
        Command::Demo(args) => demo::run(&cli.store, args, &out),
        Command::Gc(args) => gc::run(&cli.store, args, &out),
        Command::Bench(args) => bench::run(args, &out),
        Command::Serve(args) => serve::run(args, &out),
    };
    // A command that wound down on a signal ends by it.
    interrupt::end_if_received();
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
            if let Some(found) = err.downcast_ref::<commands::ProblemsFound>() {
                eprintln!("ferry: {found}");
                return ExitCode::from(1);
            }
            eprintln!("ferry: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse_after_the_subcommand() {
        let cli = Cli::try_parse_from(["ferry", "ls", "--json", "--store", "/tmp/x"]).unwrap();
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Ls(_)));
        assert!(Cli::try_parse_from(["ferry", "stash", "only-a-name"]).is_err());
    }
}
