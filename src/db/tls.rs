//! TLS with libpq's meaning for `sslmode`, `sslrootcert`, `sslcert` and `sslkey`: rustls with
//! the `ring` provider. Certificate and key files are read at each handshake, as libpq does, so
//! renewed certificates are used without a restart.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// libpq's `sslmode`: whether a connection is encrypted, and what is checked of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Unencrypted first; TLS when the server refuses that. The certificate is not checked.
    Allow,
    /// TLS when the server offers it, else unencrypted. The certificate is not checked.
    #[default]
    Prefer,
    /// TLS or nothing. The certificate is checked as for `verify-ca` when there is a root
    /// certificate (`sslrootcert`, or libpq's default `~/.postgresql/root.crt` when it exists).
    Require,
    /// TLS, with a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, with a certificate signed by a trusted CA and naming the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode `{other}`: use disable, allow, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }
}

/// libpq's TLS parameters as one place gives them (a connection string, the config, the
/// environment); what one leaves unset comes from the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode`.
    pub sslmode: Option<SslMode>,
    /// `sslrootcert`: a PEM file of trusted CAs, or `system` for the platform's trusted roots.
    pub sslrootcert: Option<String>,
    /// `sslcert`: the client certificate (PEM), for servers that ask for one.
    pub sslcert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM, unencrypted).
    pub sslkey: Option<PathBuf>,
}

impl TlsParams {
    /// Each parameter from `self`, else from `next`.
    pub(crate) fn or(self, next: TlsParams) -> TlsParams {
        TlsParams {
            sslmode: self.sslmode.or(next.sslmode),
            sslrootcert: self.sslrootcert.or(next.sslrootcert),
            sslcert: self.sslcert.or(next.sslcert),
            sslkey: self.sslkey.or(next.sslkey),
        }
    }

    /// From `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`.
    pub(crate) fn from_env() -> Result<TlsParams, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(TlsParams {
            sslmode: env("PGSSLMODE").map(|m| m.parse()).transpose()?,
            sslrootcert: env("PGSSLROOTCERT"),
            sslcert: env("PGSSLCERT").map(PathBuf::from),
            sslkey: env("PGSSLKEY").map(PathBuf::from),
        })
    }
}

/// A certificate or key file: named by the user, or libpq's default under `~/.postgresql`,
/// which counts only when it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsFile {
    path: PathBuf,
    given: bool,
}

impl TlsFile {
    /// Whether the file is to be used: a given one always (and must then be readable), a
    /// default one when it exists.
    fn in_use(&self) -> bool {
        self.given || self.path.exists()
    }
}

/// Where the CAs that may sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    System,
    File(TlsFile),
}

/// The TLS settings of a connection: its parameters resolved with libpq's defaults and rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    mode: SslMode,
    roots: Option<Roots>,
    cert: Option<TlsFile>,
    key: Option<TlsFile>,
}

impl Default for Tls {
    /// `sslmode=prefer` without files: what a connection needs no settings for.
    fn default() -> Self {
        Tls { mode: SslMode::Prefer, roots: None, cert: None, key: None }
    }
}

impl Tls {
    /// Resolves `params` as libpq does: `sslrootcert=system` makes `verify-full` the default
    /// and refuses any weaker mode; unset files default to `~/.postgresql/root.crt`,
    /// `postgresql.crt` and `postgresql.key`, used when they exist.
    pub fn resolve(params: TlsParams) -> Result<Tls, String> {
        let dir = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".postgresql"));
        let default = |name: &str| dir.as_ref().map(|d| TlsFile { path: d.join(name), given: false });
        let given = |path: PathBuf| Some(TlsFile { path, given: true });
        let roots = match params.sslrootcert {
            Some(s) if s == "system" => Some(Roots::System),
            Some(path) => given(path.into()).map(Roots::File),
            None => default("root.crt").map(Roots::File),
        };
        let mode = match (params.sslmode, &roots) {
            (None, Some(Roots::System)) => SslMode::VerifyFull,
            (Some(mode), Some(Roots::System)) if mode != SslMode::VerifyFull => {
                return Err(format!(
                    "weak sslmode \"{mode}\" may not be used with sslrootcert=system (use \"verify-full\")"
                ));
            }
            (mode, _) => mode.unwrap_or_default(),
        };
        let cert = params.sslcert.map_or_else(|| default("postgresql.crt"), given);
        let key = params.sslkey.map_or_else(|| default("postgresql.key"), given);
        Ok(Tls { mode, roots, cert, key })
    }

    /// The same settings with another `sslmode` (libpq's other rules are not applied again).
    #[cfg(test)]
    fn with_mode(mut self, mode: SslMode) -> Tls {
        self.mode = mode;
        self
    }

    /// The `sslmode`.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The roots a server certificate was checked against, for messages.
    fn roots_text(&self) -> String {
        match &self.roots {
            Some(Roots::System) => "the system's trusted roots (sslrootcert=system)".to_owned(),
            Some(Roots::File(f)) if f.given => format!("sslrootcert file {}", f.path.display()),
            Some(Roots::File(f)) => format!("{} (the default sslrootcert)", f.path.display()),
            None => "no root certificate".to_owned(),
        }
    }

    /// What the handshake checks of the server's certificate.
    fn check(&self) -> Result<Check, TlsSetupError> {
        let name = match self.mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => return Ok(Check::Nothing),
            SslMode::Require => match &self.roots {
                Some(Roots::File(f)) if f.in_use() => false,
                _ => return Ok(Check::Nothing),
            },
            SslMode::VerifyCa => false,
            SslMode::VerifyFull => true,
        };
        let roots = self.load_roots()?;
        Ok(if name { Check::ChainAndName(roots) } else { Check::Chain(roots) })
    }

    fn load_roots(&self) -> Result<RootCertStore, TlsSetupError> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Some(Roots::System) => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(TlsSetupError::NoSystemRoots);
                }
            }
            Some(Roots::File(f)) if f.in_use() => {
                for cert in read_certs("sslrootcert", &f.path)? {
                    store.add(cert).map_err(|e| TlsSetupError::Pem {
                        what: "sslrootcert",
                        path: f.path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            Some(Roots::File(f)) => {
                return Err(TlsSetupError::NoRootCert { path: Some(f.path.clone()), mode: self.mode });
            }
            None => return Err(TlsSetupError::NoRootCert { path: None, mode: self.mode }),
        }
        Ok(store)
    }

    /// The client certificate chain and key, when there is a certificate to send.
    fn identity(&self) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsSetupError> {
        let Some(cert) = self.cert.as_ref().filter(|c| c.in_use()) else { return Ok(None) };
        let certs = read_certs("sslcert", &cert.path)?;
        let key = match &self.key {
            Some(key) if key.in_use() => key,
            key => {
                return Err(TlsSetupError::NoKey {
                    cert: cert.path.clone(),
                    key: key.as_ref().map(|k| k.path.clone()),
                });
            }
        };
        check_key_permissions(&key.path)?;
        let read = PrivateKeyDer::from_pem_file(&key.path).map_err(|e| pem_error("sslkey", &key.path, e))?;
        Ok(Some((certs, read)))
    }

    /// The rustls configuration of one handshake; reads the certificate files now.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.check()? {
            Check::Nothing => Arc::new(AnyCertificate(Arc::clone(&provider))),
            Check::Chain(roots) => Arc::new(ChainOnly(webpki_verifier(roots, &provider)?)),
            Check::ChainAndName(roots) => webpki_verifier(roots, &provider)?,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.identity()? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| TlsSetupError::Identity {
                cert: self.cert.as_ref().map(|c| c.path.clone()).unwrap_or_default(),
                source: e,
            })?,
            None => builder.with_no_client_auth(),
        };
        // PostgreSQL 17's direct TLS negotiation requires it; older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
    }

    /// Says in the user's words what failed, when `error` (or one of its causes) is a TLS
    /// failure: a certificate refused either way, or a server without TLS.
    pub(crate) fn failure(&self, error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(rustls_error) = as_rustls(e) {
                return self.rustls_failure(rustls_error);
            }
            // tokio-postgres's words when the server answers the TLS request with a no
            if e.to_string() == "server does not support TLS" {
                return Some(TlsFailure::ServerWithoutTls { mode: self.mode });
            }
            cause = e.source();
        }
        None
    }

    fn rustls_failure(&self, e: &rustls::Error) -> Option<TlsFailure> {
        use CertificateError as C;
        Some(match e {
            rustls::Error::InvalidCertificate(cert) => match cert {
                C::UnknownIssuer => TlsFailure::NotTrusted { roots: self.roots_text() },
                C::NotValidForName => TlsFailure::HostName { host: None, presented: Vec::new() },
                C::NotValidForNameContext { expected, presented } => TlsFailure::HostName {
                    host: Some(expected.to_str().into_owned()),
                    presented: presented.iter().map(|name| bare_name(name)).collect(),
                },
                C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotValidYet,
                other => TlsFailure::BadCertificate { reason: format!("{other:?}") },
            },
            rustls::Error::AlertReceived(alert) => TlsFailure::ClientCertificateRefused {
                why: match alert {
                    AlertDescription::CertificateRequired => "the server requires one; set sslcert and sslkey",
                    AlertDescription::UnknownCA => "it is not signed by a CA the server trusts (its ssl_ca_file)",
                    AlertDescription::CertificateExpired => "it has expired",
                    AlertDescription::CertificateRevoked => "it is revoked",
                    AlertDescription::BadCertificate
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::AccessDenied => "the server could not verify it",
                    _ => return None,
                },
            },
            _ => return None,
        })
    }
}

/// `localhost` of rustls's `DnsName("localhost")`, `127.0.0.1` of `IpAddress(V4(…))`.
fn bare_name(presented: &str) -> String {
    let inner = presented.rsplit_once('(').map_or(presented, |(_, inner)| inner);
    inner.trim_end_matches(')').trim_matches('"').to_owned()
}

/// A rustls error, directly or inside an `io::Error` (whose `source` skips what it wraps).
fn as_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>()
        .or_else(|| e.downcast_ref::<io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>())
}

/// What the handshake checks of the server's certificate.
enum Check {
    /// Nothing but that the server holds the certificate's key (`prefer`, `require` without
    /// a root certificate).
    Nothing,
    /// That a trusted CA signed it (`verify-ca`, `require` with a root certificate).
    Chain(RootCertStore),
    /// That, and that it names the host (`verify-full`).
    ChainAndName(RootCertStore),
}

fn webpki_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsSetupError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))
}

/// Checks the handshake's signatures only: the certificate itself is taken as it comes.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the names in the certificate do not
/// matter.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem { what, path: path.to_owned(), message: "no certificate in it".into() });
    }
    Ok(certs)
}

fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsSetupError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsSetupError::Read { what, path: path.to_owned(), source },
        other => TlsSetupError::Pem { what, path: path.to_owned(), message: other.to_string() },
    }
}

/// libpq's rule: a private key readable by others is refused.
fn check_key_permissions(path: &Path) -> Result<(), TlsSetupError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsSetupError::Read {
        what: "sslkey",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode();
    let open = if meta.uid() == nix::unistd::geteuid().as_raw() {
        mode & 0o077 != 0
    } else {
        meta.uid() == 0 && mode & 0o037 != 0
    };
    if open {
        return Err(TlsSetupError::KeyPermissions { path: path.to_owned() });
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: Option<&str>, root: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(|m| m.parse().unwrap()),
            sslrootcert: root.map(str::to_owned),
            ..TlsParams::default()
        }
    }

    #[test]
    fn sslmodes_read_and_print_as_libpq_names_them() {
        for name in ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(name.parse::<SslMode>().unwrap().to_string(), name);
        }
        assert!("verify_full".parse::<SslMode>().unwrap_err().contains("verify-full"));
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    #[test]
    fn system_roots_default_to_verify_full_and_refuse_weaker_modes() {
        assert_eq!(Tls::resolve(params(None, Some("system"))).unwrap().mode(), SslMode::VerifyFull);
        let weak = Tls::resolve(params(Some("require"), Some("system"))).unwrap_err();
        assert_eq!(weak, "weak sslmode \"require\" may not be used with sslrootcert=system (use \"verify-full\")");
        assert!(Tls::resolve(params(Some("verify-ca"), Some("system"))).is_err());
        assert_eq!(Tls::resolve(params(Some("verify-full"), Some("system"))).unwrap().mode(), SslMode::VerifyFull);
    }

    #[test]
    fn require_verifies_the_chain_only_with_a_root_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("root.crt");
        let mut tls = Tls::resolve(params(Some("require"), None)).unwrap();
        tls.roots = Some(Roots::File(TlsFile { path: missing.clone(), given: false }));
        assert!(matches!(tls.check(), Ok(Check::Nothing)), "a missing default root certificate: no check");
        tls.roots = Some(Roots::File(TlsFile { path: missing, given: true }));
        assert!(matches!(tls.check(), Err(TlsSetupError::Read { what: "sslrootcert", .. })), "a given one must exist");
        let verify = tls.clone().with_mode(SslMode::VerifyCa);
        assert!(matches!(verify.check(), Err(TlsSetupError::Read { .. })));
        let prefer = tls.with_mode(SslMode::Prefer);
        assert!(matches!(prefer.check(), Ok(Check::Nothing)), "prefer checks nothing");
    }

    #[test]
    fn verify_modes_without_any_root_certificate_say_what_to_set() {
        let tls = Tls { roots: None, ..Tls::default() }.with_mode(SslMode::VerifyFull);
        let Err(e) = tls.check() else { panic!("no roots, yet checked") };
        assert!(e.to_string().contains("give sslrootcert"), "{e}");
    }

    #[test]
    fn a_key_others_can_read_is_refused_as_libpq_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_permissions(&key).unwrap_err();
        assert!(e.to_string().contains("group or world access"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_permissions(&key).unwrap();
    }

    #[test]
    fn failures_are_told_in_the_users_words() {
        let tls = Tls::resolve(params(Some("verify-full"), Some("/etc/ca.pem"))).unwrap();
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let failure = tls.failure(&wrapped).unwrap();
        assert_eq!(
            failure.to_string(),
            "the server's certificate is not trusted: it is not signed by a CA in sslrootcert file /etc/ca.pem"
        );
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("db.example.com").unwrap(),
            presented: vec!["DnsName(\"localhost\")".into()],
        });
        let text = tls.failure(&name).unwrap().to_string();
        assert_eq!(
            text,
            "host name mismatch: the server's certificate does not name `db.example.com` (it names localhost)"
        );
        let alert = rustls::Error::AlertReceived(AlertDescription::UnknownCA);
        assert!(tls.failure(&alert).unwrap().is_refusal());
        assert_eq!(tls.failure(&io::Error::other("connection reset")), None);
    }
}
