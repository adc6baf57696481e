//! A private, throwaway PostgreSQL cluster started from the installed server binaries.
//!
//! `post-save demo` and the integration tests need a PostgreSQL server of their own.
//! [`TempCluster::start`] runs `initdb` into a fresh temporary directory and starts the server
//! with `pg_ctl`, listening on a Unix socket inside that directory (and, when asked, on TCP);
//! dropping the [`TempCluster`] stops the server and removes the directory.
//! [`TempCluster::start_persistent`] does the same in a fixed directory and leaves the server
//! running for the next caller.
//!
//! Everything here is synchronous: it runs a few short-lived commands and waits for them. When
//! the process runs as root, the server binaries run as the `postgres` OS user (PostgreSQL
//! refuses to run as root) and the directory is handed to that user.
//!
//! ```no_run
//! use post_save::testing::cluster::{ClusterOptions, TempCluster};
//!
//! let cluster = TempCluster::start(ClusterOptions::default())?;
//! println!("psql '{}'", cluster.conninfo("postgres"));
//! # Ok::<(), post_save::testing::cluster::ClusterError>(())
//! ```

mod bindir;
mod conf;
mod control;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use nix::unistd::User;

use bindir::server_user;
pub use bindir::{find_bindir, server_major};
use conf::{choose_port, conninfo_value};
use control::{lock_dir, output_tail};

/// The environment variable naming the directory that holds `initdb`, `pg_ctl` and `postgres`.
pub const BINDIR_ENV: &str = "POST_SAVE_PG_BINDIR";

/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Whether the server syncs its writes to disk (`fsync`); off by default, which is much
    /// faster and fine for data that is thrown away.
    pub fsync: bool,
    /// The TCP port to listen on at 127.0.0.1; `Some(0)` picks a free one. `None` (the
    /// default) listens on the Unix socket only (`listen_addresses = ''`).
    pub tcp_port: Option<u16>,
    /// Extra server settings (`name`, `value`), written to the cluster's configuration as
    /// `name = 'value'`; later entries win over earlier ones and over this module's own.
    pub settings: Vec<(String, String)>,
}

/// How [`TempCluster::stop`] shuts the server down (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect the clients, then shut down cleanly.
    Fast,
    /// Kill every server process at once, like a crash; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Why a cluster could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No directory with the server binaries was found (see [`find_bindir`]).
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install the `postgresql` package (Debian/Ubuntu: apt-get install postgresql) or set POST_SAVE_PG_BINDIR"
    )]
    NotFound,
    /// The process runs as root, and there is no `postgres` user to run the server as.
    #[error(
        "running as root, but there is no `postgres` user to run the server as; create one (useradd --system postgres) or run as an unprivileged user"
    )]
    NoPostgresUser,
    /// A file system or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done, e.g. "could not create the cluster directory /tmp/x".
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A server command (`initdb`, `pg_ctl stop`, ...) exited unsuccessfully.
    #[error("{what} failed ({status}){}", section("output", .output))]
    Command {
        /// The command, e.g. "initdb".
        what: String,
        /// How it exited.
        status: ExitStatus,
        /// The last lines of its standard output and standard error.
        output: String,
    },
    /// The server did not start or did not accept connections.
    #[error(
        "the server did not start: {reason}{}{}",
        section("pg_ctl output", .output),
        section("server log", .log)
    )]
    Start {
        /// What went wrong, e.g. "pg_ctl start exited with exit status: 1".
        reason: String,
        /// The last lines of `pg_ctl start`'s output.
        output: String,
        /// The last lines of the server log.
        log: String,
    },
}

/// Formats a titled block of text for an error message, or nothing when the text is empty.
fn section(title: &str, text: &str) -> String {
    if text.trim().is_empty() { String::new() } else { format!("\n--- {title} ---\n{}", text.trim_end()) }
}

/// Builds a `map_err` closure that wraps an [`io::Error`] with what was being done.
fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A PostgreSQL cluster of its own: a data directory, a server process and a socket directory.
///
/// Made by [`TempCluster::start`] (removed on drop) or [`TempCluster::start_persistent`]
/// (kept running). The superuser is `postgres`, with `trust` authentication, so
/// [`TempCluster::conninfo`] needs no password.
#[derive(Debug)]
pub struct TempCluster {
    /// The directory holding everything: the socket, the log and `data/`.
    dir: PathBuf,
    data_dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// The OS user the server runs as when this process is root.
    owner: Option<User>,
    /// When set, dropping leaves the server running and the directory in place.
    persistent: bool,
}

impl TempCluster {
    /// Creates a cluster in a new temporary directory, starts it, and waits until it accepts
    /// connections. Dropping the returned value stops the server and removes the directory.
    pub fn start(opts: ClusterOptions) -> Result<TempCluster, ClusterError> {
        let bindir = find_bindir()?;
        let owner = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("post-save-pg-")
            .tempdir()
            .map_err(io_err("could not create a temporary directory"))?
            .keep();
        // From here on, dropping `cluster` on an error cleans up.
        let mut cluster = TempCluster::new(dir, bindir, owner, false);
        // Private: anyone who can reach the socket is a superuser (trust authentication).
        fs::set_permissions(&cluster.dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("could not make {} private", cluster.dir.display())))?;
        cluster.give_dir_to_owner()?;
        cluster.create(&opts)?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// Opens the cluster kept in `dir`, creating and starting it as needed, and leaves it
    /// running when dropped, so that later callers (other processes, later runs) reuse it.
    ///
    /// A running cluster is reused as is; a stopped one is started; one that cannot be started
    /// is wiped and created again. If `opts` differ from the settings the cluster was created
    /// with, the settings are rewritten and the server restarted. Concurrent callers, in this
    /// process or others, are serialised by a lock on `dir/.lock`. Stop the cluster with
    /// [`TempCluster::stop`] or `pg_ctl stop -D dir/data`, remove it by removing `dir`.
    pub fn start_persistent(dir: &Path, opts: ClusterOptions) -> Result<TempCluster, ClusterError> {
        let bindir = find_bindir()?;
        let owner = server_user()?;
        fs::create_dir_all(dir).map_err(io_err(format!("could not create the cluster directory {}", dir.display())))?;
        let mut cluster = TempCluster::new(dir.to_path_buf(), bindir, owner, true);
        cluster.check_dir_is_ours()?;
        // Private: anyone who can reach the socket is a superuser (trust authentication).
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("could not make {} private", dir.display())))?;
        cluster.give_dir_to_owner()?;
        let _lock = lock_dir(dir)?;
        match cluster.reuse(&opts) {
            Ok(true) => return Ok(cluster),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "could not reuse the kept cluster, creating it again");
                cluster.wipe_data_dir()?;
            }
        }
        cluster.create(&opts)?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// Makes a streaming standby of this cluster in a new temporary directory
    /// (`pg_basebackup -R`, so it follows this server), with `opts` as its own settings, starts
    /// it and waits until it accepts connections. Removed on drop like [`TempCluster::start`].
    pub fn start_standby(&self, opts: ClusterOptions) -> Result<TempCluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("post-save-pg-")
            .tempdir()
            .map_err(io_err("could not create a temporary directory"))?
            .keep();
        let mut standby = TempCluster::new(dir, self.bindir.clone(), self.owner.clone(), false);
        fs::set_permissions(&standby.dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("could not make {} private", standby.dir.display())))?;
        standby.give_dir_to_owner()?;
        standby.port = choose_port(&opts, None)?;
        let mut cmd = standby.command("pg_basebackup");
        cmd.arg("-D").arg(&standby.data_dir).args(["-X", "stream", "--checkpoint=fast", "--no-sync", "-d"]);
        cmd.arg(self.conninfo("postgres"));
        standby.run("pg_basebackup", cmd)?;
        // The primary's settings file came with the copy: this one has its own port and socket,
        // and follows the primary. primary_conninfo is written here rather than by `-R`, whose
        // string names every option of the libpq pg_basebackup was built with, which the
        // server's own may not know; dbname lets a standby of PostgreSQL 17 and later
        // synchronise failover slots.
        let mut opts = opts;
        opts.settings.insert(
            0,
            ("primary_conninfo".to_owned(), format!("{} application_name=standby", self.conninfo("postgres"))),
        );
        standby.write_conf(&opts)?;
        let signal = standby.data_dir.join("standby.signal");
        fs::write(&signal, "").map_err(io_err(format!("could not write {}", signal.display())))?;
        standby.give_to_owner(&signal)?;
        standby.start_again()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (`pg_ctl promote`) and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.args(["promote", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"]).arg(&self.data_dir);
        self.run("pg_ctl promote", cmd).map(drop)
    }

    fn new(dir: PathBuf, bindir: PathBuf, owner: Option<User>, persistent: bool) -> TempCluster {
        TempCluster { data_dir: dir.join("data"), dir, bindir, port: 0, owner, persistent }
    }

    /// The directory holding the server's Unix socket (pass it as libpq's `host`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The server's port: the TCP port when listening on TCP, and in any case the number in
    /// the Unix socket's name (`.s.PGSQL.<port>`), which clients need too.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq `key=value` connection string for database `dbname` over the Unix socket, as
    /// superuser `postgres`: `host=/tmp/post-save-pg-XXXX port=N user=postgres dbname=X`.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={}",
            conninfo_value(&self.dir.to_string_lossy()),
            self.port,
            conninfo_value(dbname)
        )
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server binaries this cluster runs (see [`find_bindir`]).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&self, mode: StopMode) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.args(["stop", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode.as_arg(), "-D"]).arg(&self.data_dir);
        self.run("pg_ctl stop", cmd).map(drop)
    }

    /// Starts the server again after [`TempCluster::stop`] (or a crash), and waits until it
    /// accepts connections.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.args(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"]).arg(&self.data_dir).arg("-l").arg(self.log_path());
        let out = cmd.output().map_err(io_err("could not run pg_ctl start"))?;
        if !out.status.success() {
            return Err(self.start_error(format!("pg_ctl start exited with {}", out.status), output_tail(&out)));
        }
        self.wait_until_accepting()
    }

    /// Stops the server with `mode` and starts it again.
    pub fn restart(&self, mode: StopMode) -> Result<(), ClusterError> {
        self.stop(mode)?;
        self.start_again()
    }

    /// Gives up ownership: dropping the cluster will neither stop the server nor remove its
    /// directory, which is returned.
    pub fn keep(mut self) -> PathBuf {
        self.persistent = true;
        self.dir.clone()
    }
}

impl Drop for TempCluster {
    /// Stops the server at once and removes the directory, unless the cluster is persistent.
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        if let Err(error) = self.stop(StopMode::Immediate) {
            tracing::debug!(%error, "could not stop the temporary cluster");
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "could not remove the temporary cluster");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::bindir::version_key;
    use super::conf::{CONF_FILE, conf_text, read_port};
    use super::control::tail;
    use super::*;

    #[test]
    fn conf_text_quotes_values_and_lists_extra_settings_last() {
        let opts = ClusterOptions {
            settings: vec![("application_name".into(), r"it's a \ test".into())],
            ..ClusterOptions::default()
        };
        let text = conf_text(Path::new("/tmp/x"), 5433, &opts);
        assert!(text.contains("listen_addresses = ''\n"));
        assert!(text.contains("fsync = 'off'\n"));
        assert!(text.ends_with("application_name = 'it''s a \\\\ test'\n"));
    }

    #[test]
    fn port_round_trips_through_the_settings_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(CONF_FILE);
        fs::write(&path, conf_text(dir.path(), 54321, &ClusterOptions::default())).expect("write settings");
        assert_eq!(read_port(&path).expect("port"), 54321);
    }

    #[test]
    fn conninfo_values_are_quoted_when_needed() {
        assert_eq!(conninfo_value("/tmp/a"), "/tmp/a");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a b'c"), r"'a b\'c'");
    }

    #[test]
    fn versions_sort_numerically() {
        let v = |s: &str| version_key(OsStr::new(s));
        assert!(v("15") > v("9.6"));
        assert_eq!(v("main"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (0..30).map(|i| format!("{i}\n")).collect();
        assert_eq!(tail(&text).lines().next(), Some("10"));
    }
}
