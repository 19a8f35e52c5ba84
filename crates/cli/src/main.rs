//! `switchboard`: the one binary. Parses flags, sets up logging, calls the libraries.

mod bench;
mod chat;
mod connect;
mod send;
mod serve;
mod target;
mod tls;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Real-time messaging over WebSockets"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), for example `info` or `switchboard_net=debug`.
    #[arg(long, global = true, env = "SWITCHBOARD_LOG")]
    log: Option<String>,
    /// Write logs as JSON lines (for log collectors).
    #[arg(long, global = true, env = "SWITCHBOARD_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<serve::ServeArgs>),
    /// Connect to a WebSocket URL: stdin lines go out as text, received messages come out
    /// on stdout, one per line.
    Connect(connect::ConnectArgs),
    /// Chat in a room from the terminal.
    Chat(chat::ChatArgs),
    /// Send one message to a room and print its id once the server stored it.
    Send(send::SendArgs),
    /// Load the server and print figures (runs `switchboard-bench`).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The benchmark tool is another program: no logging or runtime of ours for it.
    if let Command::Bench(args) = &mut cli.command {
        return bench::run(std::mem::take(args)).unwrap_or_else(|error| {
            eprintln!("switchboard: {error:#}");
            ExitCode::FAILURE
        });
    }
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Connect(_) | Command::Send(_) | Command::Bench(_) => "warn",
        // The screen is the chat's; logs go there only when asked for (`--log`, with
        // stderr redirected to a file).
        Command::Chat(_) => "off",
    };
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_level))
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init();
    }

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &cli.command {
        if let Some(workers) = args.workers {
            builder.worker_threads(workers.max(1));
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchboard: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Connect(args) => connect::run(args).await,
            // Run above, before the runtime.
            Command::Bench(_) => Ok(()),
            Command::Send(args) => send::run(args).await,
            Command::Chat(args) => chat::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            ExitCode::FAILURE
        }
    }
}
