//! Why the TLS settings cannot be used ([`TlsSetupError`]), and a failed handshake in the user's
//! words ([`TlsFailure`]).

use std::io;
use std::path::PathBuf;

use super::SslMode;

/// The TLS settings cannot be used: a certificate or key file is missing, unreadable or not
/// what it should be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// `verify-ca` or `verify-full` with no root certificate to verify against.
    #[error(
        "sslmode={mode} needs a root certificate, and {}: give sslrootcert (a file, or system for the platform's trusted roots), or use sslmode=require, which does not verify the server",
        match .path { Some(p) => format!("{} does not exist", p.display()), None => "HOME is not set to find ~/.postgresql/root.crt".to_owned() }
    )]
    NoRootCert {
        /// libpq's default root certificate, when HOME is set.
        path: Option<PathBuf>,
        /// The mode that needs it.
        mode: SslMode,
    },
    /// `sslrootcert=system` found no certificates.
    #[error("no trusted root certificates found on this system (sslrootcert=system)")]
    NoSystemRoots,
    /// A file could not be read.
    #[error("cannot read the {what} file {}", path.display())]
    Read {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("the {what} file {} is not usable: {message}", path.display())]
    Pem {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A client certificate without its key.
    #[error(
        "the client certificate {} has no private key{}: set sslkey",
        cert.display(),
        key.as_ref().map(|k| format!(" ({} does not exist)", k.display())).unwrap_or_default()
    )]
    NoKey {
        /// The certificate.
        cert: PathBuf,
        /// Where the key was looked for.
        key: Option<PathBuf>,
    },
    /// libpq's rule for private keys.
    #[error(
        "the private key file {} has group or world access; it must have permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root",
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
    },
    /// The certificate and key do not go together, or the key is of a kind rustls cannot use.
    #[error("the client certificate {} and its key cannot be used", cert.display())]
    Identity {
        /// The certificate.
        cert: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("cannot configure TLS")]
    Rustls(#[source] rustls::Error),
}

/// A TLS failure, in the user's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate does not lead to a trusted root.
    #[error("the server's certificate is not trusted: it is not signed by a CA in {roots}")]
    NotTrusted {
        /// Where the trusted CAs came from.
        roots: String,
    },
    /// The server's certificate names other hosts (`verify-full`).
    #[error(
        "host name mismatch: the server's certificate does not name {}{}",
        host.as_deref().map_or("the host".to_owned(), |h| format!("`{h}`")),
        if presented.is_empty() { String::new() } else { format!(" (it names {})", presented.join(", ")) }
    )]
    HostName {
        /// The host connected to.
        host: Option<String>,
        /// The names in the certificate.
        presented: Vec<String>,
    },
    /// The server's certificate has expired.
    #[error("the server's certificate has expired")]
    Expired,
    /// The server's certificate is not valid yet.
    #[error("the server's certificate is not valid yet")]
    NotValidYet,
    /// Any other reason to refuse the server's certificate.
    #[error("the server's certificate is refused: {reason}")]
    BadCertificate {
        /// What rustls said.
        reason: String,
    },
    /// The server answered the TLS request with a no (`ssl = off`).
    #[error("the server does not accept TLS connections (its ssl setting is off), and sslmode={mode} requires TLS")]
    ServerWithoutTls {
        /// The mode that requires TLS.
        mode: SslMode,
    },
    /// The server's `pg_hba.conf` has no entry for unencrypted connections of this role.
    #[error("the server accepts only TLS connections for this role, and sslmode=disable")]
    ServerRequiresTls,
    /// The server refused the client certificate, or needs one and got none.
    #[error("the server refused the client certificate: {why}")]
    ClientCertificateRefused {
        /// Why, as far as its alert tells.
        why: &'static str,
    },
}

impl TlsFailure {
    /// Whether the server refused this client (like a refused password): exit code 77.
    pub fn is_refusal(&self) -> bool {
        matches!(self, TlsFailure::ServerRequiresTls | TlsFailure::ClientCertificateRefused { .. })
    }
}
