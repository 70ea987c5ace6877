//! `hopperctl`, the operator's client: register the hierarchy, create and delegate tasks, see
//! where work is (`chain`, `tree`, `instances tree`) and follow it live (`watch`).
//!
//! Rooms: `args.rs` is the clap tree of commands and flags; `commands.rs` one function per
//! command, each one or a few gRPC calls through the generated clients; `render.rs` the text
//! and JSON output, `tree.rs` the box-drawn trees; `watch.rs` the watch loop with resume;
//! `connect.rs` the channel, the retries and the exit codes. Exit codes: 0 done, 1 the server
//! refused the request (its message, one sentence, on stderr), 2 a usage error, 3 the server
//! cannot be reached.

mod args;
mod commands;
mod connect;
mod render;
mod tree;
mod watch;

use std::process::ExitCode;

use clap::Parser;

pub use args::Cli;
use args::Command;
use commands::{delegations, instances, tasks};
use connect::Failure;
use render::Printer;

/// Runs `hopperctl` with the process's arguments; returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.code())
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let (target, printer) = (&cli.target, Printer::new(cli.output));
    match cli.command {
        Command::Watch(args) => watch::run(target, args, &printer).await,
        Command::Instances(command) => {
            instances(&mut target.connect().await?, command, &printer).await
        }
        Command::Tasks(command) => tasks(&mut target.connect().await?, command, &printer).await,
        Command::Delegations(command) => {
            delegations(&mut target.connect().await?, command, &printer).await
        }
    }
}
