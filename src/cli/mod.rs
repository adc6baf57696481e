//! The command line: clap definitions and one function per command.
//!
//! Data goes to stdout, diagnostics to stderr. Exit codes: 0 ok, 1 drift or failure, 2 usage,
//! 69 database unreachable, 77 authentication refused, 78 bad config ([`exit_code`]).

mod demo;
mod ops;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, ConfigError};
use crate::daemon::{Daemon, DaemonError, Reloader, State};
use crate::db::{self, BadConnectionString, DbError};
use crate::install::{self, TriggerError};
use crate::registry::{HandlerInfo, Registry};
use crate::systemd;

/// Exit code: a check found drift, or a command failed.
pub const EXIT_DRIFT: u8 = 1;
/// Exit code `EX_UNAVAILABLE`: the database cannot be reached, or is not one to trust (its
/// TLS certificate refused, no TLS where `sslmode` requires it).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code `EX_NOPERM`: the database refused the role (wrong password, unknown role,
/// `pg_hba.conf`, client certificate, an unencrypted connection where only TLS is accepted).
pub const EXIT_NOPERM: u8 = 77;
/// Exit code `EX_CONFIG`: the configuration is invalid (TLS files included).
pub const EXIT_CONFIG: u8 = 78;

/// post-save: Django's post_save signal for PostgreSQL itself.
#[derive(Debug, Parser)]
#[command(name = "post-save", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Configuration file [default: $CONFIGURATION_DIRECTORY/config.toml, else /etc/post-save/config.toml]
    #[arg(long, short, global = true, env = "POST_SAVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database to use, overriding `database.url`, DATABASE_URL and the PG* variables
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "POST_SAVE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Runtime threads. One (the default) runs every task on one thread: the least CPU per
    /// event, since no event is handed between threads. More spread handlers' own work (JSON,
    /// templates, TLS) over that many.
    #[arg(long, global = true, default_value_t = 1, env = "POST_SAVE_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: LISTEN, catch up, route every save to its handlers
    Run,
    /// A throwaway PostgreSQL (unless DATABASE_URL is set), a demo table, events shown live
    Demo,
    /// Create or upgrade the post_save schema
    Migrate,
    /// Install, remove, compare or print the capture triggers
    #[command(subcommand)]
    Triggers(TriggersCommand),
    /// Show the registered handlers
    #[command(subcommand)]
    Handlers(HandlersCommand),
    /// Check the configuration file
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Dead letters: deliveries that gave up
    #[command(subcommand)]
    Dead(ops::DeadCommand),
    /// The ledger's events and what became of them
    #[command(subcommand)]
    Events(ops::EventsCommand),
    /// Deliver acknowledged events again (to every handler, or to one)
    Replay(ops::ReplayArgs),
    /// Synthetic raw=true insert events for rows that already exist, through the same handlers
    Backfill(ops::BackfillArgs),
    /// Print the statements that give a role, neither superuser nor table owner, exactly the
    /// rights `run` needs for this config (pipe them to psql as the schema owner or an admin)
    Grants {
        /// The role `post-save run` connects as
        #[arg(long)]
        role: String,
    },
    /// Check everything the daemon relies on; exit 0 when healthy, 1 when a problem was found,
    /// 77 when the database refuses the role
    Doctor {
        /// JSON array of checks on stdout
        #[arg(long)]
        json: bool,
    },
}

/// `triggers …`.
#[derive(Debug, Subcommand)]
pub enum TriggersCommand {
    /// Make the database's triggers match the config (idempotent)
    Install,
    /// Remove every capture trigger
    Remove,
    /// Exit 0 when the triggers match the config, 1 (listing the differences) when not
    Check,
    /// Print the DDL `install` would run
    Sql,
}

/// `handlers …`.
#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// One row per handler: name, kind, senders, signal, filters, target
    List {
        /// JSON array on stdout (stable snake_case fields)
        #[arg(long)]
        json: bool,
    },
}

/// `config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Exit 0 when the configuration is valid, 78 (naming key and line) when not
    Check,
}

/// Runs a parsed command line. Returns the exit code of a command that completed.
pub async fn run(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Run => run_daemon(&cli.global).await,
        Command::Demo => demo::run(&cli.global).await,
        Command::Migrate => migrate(&cli.global).await,
        Command::Triggers(t) => triggers_command(&cli.global, t).await,
        Command::Handlers(HandlersCommand::List { json }) => list_handlers(&cli.global, *json),
        Command::Grants { role } => print_grants(&cli.global, role),
        Command::Doctor { json } => ops::doctor(&cli.global, *json).await,
        Command::Dead(d) => ops::dead(&cli.global, d).await,
        Command::Events(e) => ops::events(&cli.global, e).await,
        Command::Replay(r) => ops::replay(&cli.global, r).await,
        Command::Backfill(b) => ops::backfill(&cli.global, b).await,
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli.global)?;
            eprintln!("config ok: {} watched tables, {} handlers", config.watches.len(), config.handlers.len());
            Ok(0)
        }
    }
}

/// Maps an error to the process exit code: the one place where failures become codes. The
/// first cause in the chain that has a code of its own decides; anything else is 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error.chain().find_map(code_of).unwrap_or(EXIT_DRIFT)
}

fn code_of(cause: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if cause.is::<ConfigError>() || cause.is::<BadConnectionString>() || cause.is::<crate::handler::BuildError>() {
        return Some(EXIT_CONFIG);
    }
    // The daemon wraps its start-up database errors transparently, which hides them from a
    // walk of the chain: look inside.
    let db = match cause.downcast_ref::<DaemonError>() {
        Some(DaemonError::Db(e)) => Some(e),
        _ => cause.downcast_ref::<DbError>(),
    };
    if let Some(e) = db {
        if e.is_misconfigured() {
            return Some(EXIT_CONFIG);
        }
        if e.is_auth_failure() {
            return Some(EXIT_NOPERM);
        }
        if e.is_unreachable() {
            return Some(EXIT_UNAVAILABLE);
        }
    }
    // A reader that went away (`post-save events list | head`) is not a failure.
    match cause.downcast_ref::<std::io::Error>() {
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(0),
        _ => None,
    }
}

fn config_path(global: &Global) -> Option<PathBuf> {
    if let Some(p) = &global.config {
        return Some(p.clone());
    }
    if let Some(dir) = std::env::var_os("CONFIGURATION_DIRECTORY") {
        return Some(PathBuf::from(dir).join("config.toml"));
    }
    let default = PathBuf::from("/etc/post-save/config.toml");
    default.exists().then_some(default)
}

/// Loads the configuration the global options point at.
pub fn load_config(global: &Global) -> Result<Config> {
    let Some(path) = config_path(global) else {
        return Err(ConfigError {
            file: None,
            line: None,
            key: None,
            message: "no configuration file: pass --config or set POST_SAVE_CONFIG".into(),
        }
        .into());
    };
    Ok(Config::load(&path)?)
}

/// The connection settings the global options and the config point at.
pub fn pg_config(global: &Global, config: &Config) -> Result<db::Settings> {
    let url = global.database_url.as_deref().or(config.database.url.as_deref());
    let pg = db::resolve_with(url, &config.database.tls())?;
    Ok(match config.database.listen_url.as_deref() {
        Some(direct) => pg.with_session(db::resolve_with(Some(direct), &config.database.tls())?),
        None => pg,
    })
}

/// A connection for a command: the direct one when `database.listen_url` is set (migrations
/// and installs take session locks a transaction pooler would lose).
async fn connect(global: &Global, config: &Config) -> Result<tokio_postgres::Client> {
    let pg = pg_config(global, config)?;
    let (client, _task) = db::connect(pg.session()).await?;
    Ok(client)
}

async fn run_daemon(global: &Global) -> Result<u8> {
    let shutdown = shutdown_signal()?;
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut config = load_config(global)?;
    let pg = pg_config(global, &config)?;
    config.handlers.iter_mut().for_each(|h| h.kind.default_database(pg.session()));
    let registry = Registry::from_config(&config)?;
    tracing::info!(handlers = registry.describe().len(), tables = config.watches.len(), "starting");
    let mut daemon = Daemon::new(config.clone(), registry, pg.clone());
    if let Some(interval) = systemd::watchdog() {
        daemon = daemon.heartbeat(interval / 4);
    }
    let supervisor = tokio::spawn(systemd::supervise(daemon.state(), daemon.wal_blocked(), daemon.alive()));
    let status = (daemon.state(), daemon.wal_blocked());
    let reloads = tokio::spawn(reload_on_hangup(hangup, global.config.clone(), config, pg, daemon.reloader(), status));
    let result = daemon.run(shutdown.cancelled_owned()).await;
    reloads.abort();
    let _ = supervisor.await;
    result?;
    Ok(0)
}

/// On every SIGHUP: re-reads the config file and, when it is valid and its handlers build,
/// swaps the daemon's handlers; otherwise logs why and keeps the old ones.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    path: Option<PathBuf>,
    mut current: Config,
    pg: db::Settings,
    reloader: Reloader,
    (state, wal): (
        tokio::sync::watch::Receiver<State>,
        tokio::sync::watch::Receiver<Option<crate::capture::wal::Blocked>>,
    ),
) {
    let global = Global { config: path, database_url: None, log_format: LogFormat::Text, threads: 1 };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        systemd::reloading();
        match reload_config(&global, &pg) {
            Ok((config, registry)) => {
                warn_needs_restart(&current, &config);
                let handlers = registry.describe().len();
                if reloader.replace(registry).await {
                    tracing::info!(handlers, "configuration reloaded");
                    current = config;
                }
            }
            Err(error) => {
                let at = error.chain().find_map(|c| c.downcast_ref::<ConfigError>());
                tracing::error!(
                    error = %format!("{error:#}"),
                    key = at.and_then(|e| e.key.as_deref()),
                    line = at.and_then(|e| e.line),
                    "configuration reload failed; keeping the old handlers"
                );
            }
        }
        systemd::ready(&systemd::status(&state.borrow(), wal.borrow().as_ref()));
    }
}

/// The new config and its handlers, built but not started.
fn reload_config(global: &Global, pg: &db::Settings) -> Result<(Config, Registry)> {
    let mut config = load_config(global)?;
    config.handlers.iter_mut().for_each(|h| h.kind.default_database(pg.session()));
    let registry = Registry::from_config(&config)?;
    Ok((config, registry))
}

/// A reload swaps handlers only; other changes wait for a restart.
fn warn_needs_restart(old: &Config, new: &Config) {
    if old.watches != new.watches {
        tracing::warn!(
            "watched tables changed: run `post-save triggers install`, then restart the daemon for them to take effect"
        );
    }
    if old.database != new.database || format!("{:?}", old.daemon) != format!("{:?}", new.daemon) {
        tracing::warn!("[database] or [daemon] settings changed: they take effect at the next restart");
    }
}

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are installed before this
/// returns, so a signal during start-up cannot kill the process half-way.
pub fn shutdown_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = tokio_util::sync::CancellationToken::new();
    let fired = token.clone();
    // Cancel before logging: nothing on the logging path may stand between a signal and the
    // shutdown.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {
                fired.cancel();
                tracing::info!("SIGTERM received");
            }
            _ = int.recv() => {
                fired.cancel();
                tracing::info!("SIGINT received");
            }
        }
    });
    Ok(token)
}

async fn migrate(global: &Global) -> Result<u8> {
    let config = config_or_default(global)?;
    let mut client = connect(global, &config).await?;
    let applied = db::migrate(&mut client).await?;
    if applied.is_empty() {
        eprintln!("post_save schema is up to date");
    }
    for m in applied {
        eprintln!("applied {m}");
    }
    Ok(0)
}

/// Commands that can work without a config use an empty one when none is given.
fn config_or_default(global: &Global) -> Result<Config> {
    match config_path(global) {
        Some(_) => load_config(global),
        None => Ok(Config::default()),
    }
}

async fn triggers_command(global: &Global, command: &TriggersCommand) -> Result<u8> {
    let config = load_config(global)?;
    let mut client = connect(global, &config).await?;
    match command {
        TriggersCommand::Install => {
            db::migrate(&mut client).await?;
            let sql = install::install(&mut client, &config).await.map_err(trigger_error)?;
            if sql.is_empty() {
                eprintln!("triggers already match the config ({} tables): nothing changed", config.watches.len());
            } else {
                eprintln!("triggers installed on {} tables", config.watches.len());
            }
            tracing::debug!(sql = %sql, "trigger DDL");
            Ok(0)
        }
        TriggersCommand::Remove => {
            let tables = install::remove(&mut client).await.map_err(trigger_error)?;
            eprintln!("triggers removed from {} tables", tables.len());
            Ok(0)
        }
        TriggersCommand::Check => {
            let drift = install::check(&client, &config).await.map_err(trigger_error)?;
            if drift.is_empty() {
                eprintln!("triggers match the config ({} tables)", config.watches.len());
                return Ok(0);
            }
            let mut out = std::io::stdout().lock();
            for d in &drift {
                writeln!(out, "{d}")?;
            }
            Ok(EXIT_DRIFT)
        }
        TriggersCommand::Sql => {
            let sql = install::plan(&client, &config).await.map_err(trigger_error)?;
            std::io::stdout().lock().write_all(sql.as_bytes())?;
            Ok(0)
        }
    }
}

fn trigger_error(e: TriggerError) -> anyhow::Error {
    match e {
        TriggerError::Query(q) if q.is_closed() => DbError::Query(q).into(),
        other => other.into(),
    }
}

fn print_grants(global: &Global, role: &str) -> Result<u8> {
    let config = load_config(global)?;
    let mut out = std::io::stdout().lock();
    for statement in crate::install::grants::statements(&config, role) {
        writeln!(out, "{statement}")?;
    }
    Ok(0)
}

fn list_handlers(global: &Global, json: bool) -> Result<u8> {
    let config = load_config(global)?;
    let handlers = Registry::describe_config(&config);
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&handlers).context("encoding JSON")?;
        out.write_all(text.as_bytes())?;
        writeln!(out)?;
    } else if std::io::stdout().is_terminal() {
        writeln!(out, "{}", handlers_table(&handlers))?;
    } else {
        writeln!(out, "name\tkind\tsenders\tsignal\tcreated\tcolumns\ttarget")?;
        for h in &handlers {
            let r = row(h);
            writeln!(out, "{}", r.join("\t"))?;
        }
    }
    Ok(0)
}

fn row(h: &HandlerInfo) -> [String; 7] {
    let senders = if h.senders.is_empty() { "*".to_owned() } else { h.senders.join(",") };
    let created = match h.created {
        Some(true) => "created",
        Some(false) => "updated",
        None => "any",
    };
    let columns = if h.columns.is_empty() { "*".to_owned() } else { h.columns.join(",") };
    [h.name.clone(), h.kind.clone(), senders, h.signal.clone(), created.into(), columns, h.target.clone()]
}

fn handlers_table(handlers: &[HandlerInfo]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(["name", "kind", "senders", "signal", "created", "columns", "target"]);
    for h in handlers {
        table.add_row(row(h));
    }
    table
}

/// Runs the command line: parse, set up logging, run on a runtime, map errors to exit codes.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    // One thread unless asked for more: a save read from the WAL or the ledger passes from the
    // reader to the router, a handler's task and the outcome writer, and on a multi-thread
    // runtime each hand-off may wake another thread. bench/DECISIONS.md ("One runtime
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
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            let code = exit_code(&error);
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
