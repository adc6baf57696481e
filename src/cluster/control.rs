//! The steps behind [`TempCluster`]'s methods: making or reusing the data directory, running the
//! server programs as the server's user and waiting for the socket; the lock that serialises
//! persistent clusters, and the tails of output and log that errors keep.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::conf::{CONF_FILE, choose_port, conf_text, read_port};
use super::{ClusterError, ClusterOptions, StopMode, TempCluster, io_err, server_major};

/// How many lines of a command's output or of the server log an error keeps.
const TAIL_LINES: usize = 20;
/// How long to wait for the socket to accept connections once `pg_ctl` reports success.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

impl TempCluster {
    /// Reuses an existing cluster in `self.dir`; `Ok(false)` when there is none.
    pub(super) fn reuse(&mut self, opts: &ClusterOptions) -> Result<bool, ClusterError> {
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
    pub(super) fn create(&mut self, opts: &ClusterOptions) -> Result<(), ClusterError> {
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
    pub(super) fn write_conf(&self, opts: &ClusterOptions) -> Result<bool, ClusterError> {
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
    pub(super) fn wipe_data_dir(&self) -> Result<(), ClusterError> {
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
    pub(super) fn wait_until_accepting(&self) -> Result<(), ClusterError> {
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

    pub(super) fn start_error(&self, reason: String, output: String) -> ClusterError {
        ClusterError::Start { reason, output, log: file_tail(&self.log_path()) }
    }

    /// A command for one of the server programs, run as the server's OS user.
    pub(super) fn command(&self, program: &str) -> Command {
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
    pub(super) fn run(&self, what: &str, mut cmd: Command) -> Result<Output, ClusterError> {
        let out = cmd.output().map_err(io_err(format!("could not run {what}")))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ClusterError::Command { what: what.to_owned(), status: out.status, output: output_tail(&out) })
        }
    }

    /// Refuses a directory that is a symlink or belongs to someone else: in a shared place like
    /// `/tmp`, another user could have put it there.
    pub(super) fn check_dir_is_ours(&self) -> Result<(), ClusterError> {
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

    pub(super) fn give_dir_to_owner(&self) -> Result<(), ClusterError> {
        self.give_to_owner(&self.dir)
    }

    pub(super) fn give_to_owner(&self, path: &Path) -> Result<(), ClusterError> {
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

/// Takes the lock that serialises [`TempCluster::start_persistent`] on `dir`; released on drop.
pub(super) fn lock_dir(dir: &Path) -> Result<File, ClusterError> {
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

/// The last lines of a command's standard output followed by its standard error (where the
/// error is, last).
pub(super) fn output_tail(out: &Output) -> String {
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

pub(super) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}
