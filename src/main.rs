//! The `post-save` command. Orchestration only: parse, set up logging, run, map errors to
//! exit codes.

mod cli;
mod demo;
mod ops;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, LogFormat};

// mimalloc instead of glibc's malloc: draining the ledger allocates and frees a few dozen small
// blocks per event (JSON values, strings, one task per row lane). Profiles of a 400,000-event
// drain had a third of the daemon's CPU in glibc's malloc and free (`malloc_consolidate`,
// `_int_free`); bench/experiments.md has the before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    // One thread unless asked for more: a save read from the WAL or the ledger passes from the
    // reader to the router, a handler's task and the outcome writer, and on a multi-thread
    // runtime each hand-off may wake another thread. bench/experiments.md ("One runtime
    // thread") has the daemon's CPU per event both ways.
    let mut builder = if cli.global.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(cli.global.threads));
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            let code = cli::exit_code(&error);
            // Not `eprintln!`: it panics when stderr is a closed pipe, which would turn this
            // exit code into 101.
            if code != 0 {
                let _ = writeln!(std::io::stderr(), "error: {error:#}");
            }
            ExitCode::from(code)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` filters (default `info`). Under journald (`JOURNAL_STREAM`)
/// lines carry no timestamp or colour: the journal adds its own.
///
/// A log line that cannot be written is dropped. tracing-subscriber's default reports a failed
/// write with `eprintln!`, which panics when stderr is a closed pipe (`post-save run 2>&1 | tee
/// log` after `tee` died): the panic unwound whatever task was logging, the SIGTERM/SIGINT
/// task among them, so the daemon no longer stopped on either. Rust ignores SIGPIPE, so such a
/// write fails at once with `EPIPE` instead of killing or blocking the process.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,refinery_core=warn,tokio_postgres=warn"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() && !journald;
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().init(),
        (LogFormat::Text, false) => builder.with_ansi(colour).init(),
    }
}
