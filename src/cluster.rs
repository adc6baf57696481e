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
//! use post_save::cluster::{ClusterOptions, TempCluster};
//!
//! let cluster = TempCluster::start(ClusterOptions::default())?;
//! println!("psql '{}'", cluster.conninfo("postgres"));
//! # Ok::<(), post_save::cluster::ClusterError>(())
//! ```

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::User;

/// The environment variable naming the directory that holds `initdb`, `pg_ctl` and `postgres`.
pub const BINDIR_ENV: &str = "POST_SAVE_PG_BINDIR";

/// The server binaries a directory must hold to count as a PostgreSQL bindir.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// The settings file this module writes into the data directory (included by `postgresql.conf`).
const CONF_FILE: &str = "post_save.conf";
/// How many lines of a command's output or of the server log an error keeps.
const TAIL_LINES: usize = 20;
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long to wait for the socket to accept connections once `pg_ctl` reports success.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Reuses an existing cluster in `self.dir`; `Ok(false)` when there is none.
    fn reuse(&mut self, opts: &ClusterOptions) -> Result<bool, ClusterError> {
        let Ok(kept) = fs::read_to_string(self.data_dir.join("PG_VERSION")) else {
            return Ok(false);
        };
        // A data directory made by another major version cannot be run by these binaries (and
        // a server of that version may still be running on it): it is made again.
        let major = server_major(&self.bindir)?;
        if kept.trim() != major.to_string() {
            return Err(ClusterError::Start {
                reason: format!(
                    "the kept cluster is PostgreSQL {}, the binaries in {} are {major}",
                    kept.trim(),
                    self.bindir.display()
                ),
                output: String::new(),
                log: String::new(),
            });
        }
        let kept_port = read_port(&self.data_dir.join(CONF_FILE))?;
        self.port = choose_port(opts, Some(kept_port))?;
        let changed = self.write_conf(opts)?;
        if !self.accepts_connections() {
            self.start_again()?;
        } else if changed {
            self.restart(StopMode::Fast)?;
        }
        Ok(true)
    }

    /// Runs `initdb`, then writes this module's settings (choosing the port).
    fn create(&mut self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        self.port = choose_port(opts, None)?;
        match self.initdb("C.UTF-8") {
            Err(ClusterError::Command { output, .. }) if output.contains("locale") => {
                self.wipe_data_dir()?;
                self.initdb("C")?;
            }
            other => other?,
        }
        let mut main_conf = OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))
            .map_err(io_err("could not open postgresql.conf"))?;
        writeln!(main_conf, "\ninclude = '{CONF_FILE}'").map_err(io_err("could not write postgresql.conf"))?;
        self.write_conf(opts).map(drop)
    }

    fn initdb(&self, locale: &str) -> Result<(), ClusterError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .arg(format!("--locale={locale}"));
        self.run("initdb", cmd).map(drop)
    }

    /// Writes the settings file; returns whether its content changed.
    fn write_conf(&self, opts: &ClusterOptions) -> Result<bool, ClusterError> {
        let path = self.data_dir.join(CONF_FILE);
        let text = conf_text(&self.dir, self.port, opts);
        if fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        fs::write(&path, text).map_err(io_err(format!("could not write {}", path.display())))?;
        self.give_to_owner(&path)?;
        Ok(true)
    }

    /// Stops whatever server may run on the data directory and removes the directory.
    fn wipe_data_dir(&self) -> Result<(), ClusterError> {
        if self.data_dir.join("postmaster.pid").exists() {
            // Best effort: a stale pid file makes this fail, which is fine.
            let _ = self.stop(StopMode::Immediate);
        }
        match fs::remove_dir_all(&self.data_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(ClusterError::Io { what: format!("could not remove {}", self.data_dir.display()), source: e })
            }
            _ => Ok(()),
        }
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.join(format!(".s.PGSQL.{}", self.port))
    }

    fn accepts_connections(&self) -> bool {
        UnixStream::connect(self.socket_path()).is_ok()
    }

    /// Polls the socket: `pg_ctl start -w` has normally waited long enough already.
    fn wait_until_accepting(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        while !self.accepts_connections() {
            if Instant::now() > deadline {
                let reason =
                    format!("{} did not accept connections within {ACCEPT_TIMEOUT:?}", self.socket_path().display());
                return Err(self.start_error(reason, String::new()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_error(&self, reason: String, output: String) -> ClusterError {
        ClusterError::Start { reason, output, log: file_tail(&self.log_path()) }
    }

    /// A command for one of the server programs, run as the server's OS user.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        // A directory the server user can enter: initdb complains about one it cannot.
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        // The server may outlive this process (the test harness's cluster): hand it only the
        // variables PostgreSQL and its libraries need, not this process's whole environment.
        cmd.env_clear();
        for name in ["PATH", "TZ", "TMPDIR", "LD_LIBRARY_PATH"] {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        if let Some(user) = &self.owner {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd
    }

    /// Runs `cmd` to completion; a failure keeps the tail of its output.
    fn run(&self, what: &str, mut cmd: Command) -> Result<Output, ClusterError> {
        let out = cmd.output().map_err(io_err(format!("could not run {what}")))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ClusterError::Command { what: what.to_owned(), status: out.status, output: output_tail(&out) })
        }
    }

    /// Refuses a directory that is a symlink or belongs to someone else: in a shared place like
    /// `/tmp`, another user could have put it there.
    fn check_dir_is_ours(&self) -> Result<(), ClusterError> {
        let meta =
            fs::symlink_metadata(&self.dir).map_err(io_err(format!("could not inspect {}", self.dir.display())))?;
        let owners = [Some(nix::unistd::geteuid().as_raw()), self.owner.as_ref().map(|u| u.uid.as_raw())];
        if meta.is_dir() && owners.contains(&Some(meta.uid())) {
            return Ok(());
        }
        Err(ClusterError::Io {
            what: format!("{} is not a directory owned by this user", self.dir.display()),
            source: io::ErrorKind::PermissionDenied.into(),
        })
    }

    fn give_dir_to_owner(&self) -> Result<(), ClusterError> {
        self.give_to_owner(&self.dir)
    }

    fn give_to_owner(&self, path: &Path) -> Result<(), ClusterError> {
        let Some(user) = &self.owner else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(io_err(format!(
            "could not give {} to the {} user",
            path.display(),
            user.name
        )))
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

/// Finds the directory holding the PostgreSQL server binaries (`initdb`, `pg_ctl`,
/// `postgres`).
///
/// In order: `$POST_SAVE_PG_BINDIR` (used alone when set); the directory of `initdb` on
/// `PATH` (symlinks resolved); `pg_config --bindir`; the highest version under
/// `/usr/lib/postgresql/*/bin` (Debian and Ubuntu). A candidate counts only if it holds all
/// three programs.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_programs(&dir) { Ok(dir) } else { Err(ClusterError::NotFound) };
    }
    bindir_from_path().or_else(bindir_from_pg_config).or_else(bindir_from_debian_layout).ok_or(ClusterError::NotFound)
}

/// The major version of the server binaries in `bindir` (`postgres --version`): 15 for
/// "postgres (PostgreSQL) 15.10 (Debian 15.10-0+deb12u1)".
pub fn server_major(bindir: &Path) -> Result<u32, ClusterError> {
    let program = bindir.join("postgres");
    let out = Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("could not run {} --version", program.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| word.split('.').next().and_then(|m| m.parse().ok()))
        .filter(|_| out.status.success())
        .ok_or_else(|| ClusterError::Command {
            what: format!("{} --version", program.display()),
            status: out.status,
            output: output_tail(&out),
        })
}

fn has_server_programs(dir: &Path) -> bool {
    SERVER_PROGRAMS.iter().all(|p| is_executable(&dir.join(p)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn bindir_from_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let initdb = std::env::split_paths(&path).map(|dir| dir.join("initdb")).find(|p| is_executable(p))?;
    let resolved = fs::canonicalize(&initdb).ok()?;
    [resolved.parent()?, initdb.parent()?].into_iter().find(|dir| has_server_programs(dir)).map(Path::to_path_buf)
}

fn bindir_from_pg_config() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && has_server_programs(&dir)).then_some(dir)
}

fn bindir_from_debian_layout() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = version_key(entry.file_name().as_os_str())?;
            let bindir = entry.path().join("bin");
            has_server_programs(&bindir).then_some((version, bindir))
        })
        .max()
        .map(|(_, bindir)| bindir)
}

/// "15" -> [15], "9.6" -> [9, 6]; `None` for names that are not versions.
fn version_key(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|part| part.parse().ok()).collect()
}

/// The OS user to run the server as: `postgres` when this process is root, else none.
fn server_user() -> Result<Option<User>, ClusterError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(user)),
        Ok(None) => Err(ClusterError::NoPostgresUser),
        Err(errno) => {
            Err(ClusterError::Io { what: "could not look up the postgres user".to_owned(), source: errno.into() })
        }
    }
}

/// Takes the lock that serialises [`TempCluster::start_persistent`] on `dir`; released on drop.
fn lock_dir(dir: &Path) -> Result<File, ClusterError> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("could not open {}", path.display())))?;
    file.lock().map_err(io_err(format!("could not lock {}", path.display())))?;
    Ok(file)
}

/// The port to use: the one asked for, else the kept one, else a free TCP port.
fn choose_port(opts: &ClusterOptions, kept: Option<u16>) -> Result<u16, ClusterError> {
    match (opts.tcp_port, kept) {
        (Some(port), _) if port != 0 => Ok(port),
        (_, Some(port)) => Ok(port),
        _ => free_port(),
    }
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_err("could not find a free port"))
}

/// Reads `port = N` back from a settings file written by [`conf_text`].
fn read_port(path: &Path) -> Result<u16, ClusterError> {
    let text = fs::read_to_string(path).map_err(io_err(format!("could not read {}", path.display())))?;
    text.lines().find_map(|line| line.strip_prefix("port = '")?.strip_suffix('\'')?.parse().ok()).ok_or_else(|| {
        ClusterError::Io {
            what: format!("could not read the port from {}", path.display()),
            source: io::ErrorKind::InvalidData.into(),
        }
    })
}

/// The content of the settings file: this module's settings, then the caller's.
fn conf_text(socket_dir: &Path, port: u16, opts: &ClusterOptions) -> String {
    let listen = if opts.tcp_port.is_some() { "127.0.0.1" } else { "" };
    let own = [
        ("listen_addresses", listen.to_owned()),
        ("port", port.to_string()),
        ("unix_socket_directories", socket_dir.to_string_lossy().into_owned()),
        // Only the server's user (and root) may connect, whatever the directory's mode.
        ("unix_socket_permissions", "0700".to_owned()),
        ("fsync", if opts.fsync { "on" } else { "off" }.to_owned()),
    ];
    let extra = opts.settings.iter().map(|(k, v)| (k.as_str(), v.clone()));
    let mut text = String::from("# written by post-save; rewritten when the cluster is reused\n");
    for (name, value) in own.into_iter().chain(extra) {
        let value = value.replace('\\', "\\\\").replace('\'', "''");
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{name} = '{value}'");
    }
    text
}

/// Quotes a libpq `key=value` value when it needs it.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The last lines of a command's standard output followed by its standard error (where the
/// error is, last).
fn output_tail(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    tail(&text)
}

/// The last lines of a file, read from its end; empty if it cannot be read.
fn file_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        file.read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => tail(&String::from_utf8_lossy(&bytes)),
        Err(_) => String::new(),
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
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
