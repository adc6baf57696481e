//! Finding the PostgreSQL server binaries and their major version, and the OS user to run them
//! as.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::User;

use super::control::output_tail;
use super::{BINDIR_ENV, ClusterError, io_err};

/// The server binaries a directory must hold to count as a PostgreSQL bindir.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

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
pub(super) fn version_key(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|part| part.parse().ok()).collect()
}

/// The OS user to run the server as: `postgres` when this process is root, else none.
pub(super) fn server_user() -> Result<Option<User>, ClusterError> {
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
