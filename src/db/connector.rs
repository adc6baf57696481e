//! How a connection gets its TLS: libpq's attempts for each `sslmode`, the connector
//! tokio-postgres calls for a handshake, and the handshake of the replication stream (which
//! speaks the wire protocol itself).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{Host, SslMode as WireMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{SslMode, Tls};

/// The stream of a tokio-postgres connection that is (or could have been) encrypted.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a connection as libpq would for the `sslmode` of `tls`: `allow` tries unencrypted
/// first and TLS when the server refuses that; `prefer` tries TLS when the server offers it,
/// and unencrypted when the server refused the encrypted session. Unix sockets never use TLS.
pub(crate) async fn open(
    pg: &tokio_postgres::Config,
    tls: &Arc<Tls>,
) -> Result<(Client, Connection<Socket, TlsStream>), tokio_postgres::Error> {
    let local = pg.get_hostaddrs().is_empty() && pg.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)));
    let mode = if local { SslMode::Disable } else { tls.mode() };
    match mode {
        SslMode::Disable => attempt(pg, tls, WireMode::Disable).await.0,
        SslMode::Allow => match attempt(pg, tls, WireMode::Disable).await.0 {
            Err(e) if e.as_db_error().is_some() => attempt(pg, tls, WireMode::Require).await.0,
            done => done,
        },
        SslMode::Prefer => match attempt(pg, tls, WireMode::Prefer).await {
            (Err(e), true) if e.as_db_error().is_some() => attempt(pg, tls, WireMode::Disable).await.0,
            (done, _) => done,
        },
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => attempt(pg, tls, WireMode::Require).await.0,
    }
}

/// One attempt with tokio-postgres's `mode`; also says whether a TLS handshake began.
async fn attempt(
    pg: &tokio_postgres::Config,
    tls: &Arc<Tls>,
    mode: WireMode,
) -> (Result<(Client, Connection<Socket, TlsStream>), tokio_postgres::Error>, bool) {
    let mut pg = pg.clone();
    pg.ssl_mode(mode);
    let began = Arc::new(AtomicBool::new(false));
    let result = pg.connect(Connector { tls: Arc::clone(tls), began: Arc::clone(&began) }).await;
    (result, began.load(Ordering::Relaxed))
}

/// tokio-postgres's maker of handshakes for one connection attempt.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: Arc<Tls>,
    /// Set when the server agreed to TLS and a handshake began.
    began: Arc<AtomicBool>,
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type TlsConnect = Handshake;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, Self::Error> {
        Ok(Handshake { host: host.to_owned(), tls: Arc::clone(&self.tls), began: Arc::clone(&self.began) })
    }
}

/// The handshake with one host, once the server agreed to TLS: the rustls configuration is
/// made (the files read) then.
pub(crate) struct Handshake {
    host: String,
    tls: Arc<Tls>,
    began: Arc<AtomicBool>,
}

impl TlsConnect<Socket> for Handshake {
    type Stream = TlsStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, BoxError>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        self.began.store(true, Ordering::Relaxed);
        Box::pin(async move {
            let mut make = MakeRustlsConnect::new(self.tls.client_config()?);
            let Ok(handshake) = MakeTlsConnect::<Socket>::make_tls_connect(&mut make, &self.host);
            Ok(handshake.connect(socket).await?)
        })
    }
}

/// The replication stream's handshake with `host` over `stream`, checking what every
/// connection checks.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    host: &str,
    tls: &Tls,
) -> Result<tokio_rustls::client::TlsStream<S>, BoxError> {
    let config = tls.client_config()?;
    let name = ServerName::try_from(host.to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await?)
}

/// SCRAM's `tls-server-end-point` channel binding data (RFC 5929): the hash of the server's
/// certificate with the hash function of its signature (SHA-256 for MD5 and SHA-1). `None`
/// for a signature without one (Ed25519), as in PostgreSQL.
pub(crate) fn server_end_point(session: &rustls::ClientConnection) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912 as oid;
    let der = session.peer_certificates()?.first()?;
    let algorithm = x509_cert::Certificate::from_der(der).ok()?.signature_algorithm.oid;
    let bytes = der.as_ref();
    Some(match algorithm {
        oid::MD_5_WITH_RSA_ENCRYPTION
        | oid::SHA_1_WITH_RSA_ENCRYPTION
        | oid::DSA_WITH_SHA_1
        | oid::SHA_256_WITH_RSA_ENCRYPTION
        | oid::ECDSA_WITH_SHA_256
        | oid::DSA_WITH_SHA_256 => sha2::Sha256::digest(bytes).to_vec(),
        oid::SHA_224_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_224 | oid::DSA_WITH_SHA_224 => {
            sha2::Sha224::digest(bytes).to_vec()
        }
        oid::SHA_384_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_384 => sha2::Sha384::digest(bytes).to_vec(),
        oid::SHA_512_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_512 => sha2::Sha512::digest(bytes).to_vec(),
        _ => return None,
    })
}
