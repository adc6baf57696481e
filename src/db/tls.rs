//! TLS with libpq's meaning for `sslmode`, `sslrootcert`, `sslcert` and `sslkey`: rustls with
//! the `ring` provider. Certificate and key files are read at each handshake, as libpq does, so
//! renewed certificates are used without a restart.

mod error;
mod files;
mod verify;

use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig};

pub use error::{TlsFailure, TlsSetupError};
use verify::{AnyCertificate, ChainOnly, Check, webpki_verifier};

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

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;

    use super::files::check_key_permissions;
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
