//! The cluster's settings file and port, and the quoting of connection string values.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use super::{ClusterError, ClusterOptions, io_err};

/// The settings file this module writes into the data directory (included by `postgresql.conf`).
pub(super) const CONF_FILE: &str = "post_save.conf";

/// The port to use: the one asked for, else the kept one, else a free TCP port.
pub(super) fn choose_port(opts: &ClusterOptions, kept: Option<u16>) -> Result<u16, ClusterError> {
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
pub(super) fn read_port(path: &Path) -> Result<u16, ClusterError> {
    let text = fs::read_to_string(path).map_err(io_err(format!("could not read {}", path.display())))?;
    text.lines().find_map(|line| line.strip_prefix("port = '")?.strip_suffix('\'')?.parse().ok()).ok_or_else(|| {
        ClusterError::Io {
            what: format!("could not read the port from {}", path.display()),
            source: io::ErrorKind::InvalidData.into(),
        }
    })
}

/// The content of the settings file: this module's settings, then the caller's.
pub(super) fn conf_text(socket_dir: &Path, port: u16, opts: &ClusterOptions) -> String {
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
pub(super) fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}
