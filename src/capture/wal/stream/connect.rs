//! Opening a replication connection: the first host that answers, TLS as libpq's `sslmode`
//! asks, then the start-up and authentication (password, MD5, SCRAM with channel binding).

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding as Binding, Host, SslNegotiation, TargetSessionAttrs};

use super::{Replication, StreamError, application_name};
use crate::db::{Settings, SslMode, TlsSetupError};

/// A connection's socket: TCP or Unix, encrypted or not.
pub(super) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// SCRAM's channel binding data, when the socket is encrypted.
    fn end_point(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Socket for tokio::net::TcpStream {}

impl Socket for tokio::net::UnixStream {}

impl Socket for tokio_rustls::client::TlsStream<Box<dyn Socket>> {
    fn end_point(&self) -> Option<Vec<u8>> {
        crate::db::server_end_point(self.get_ref().1)
    }
}

impl Replication {
    /// Connects to the first host of `settings` that answers, as a logical replication client
    /// of its database, with the TLS every connection has (libpq's `sslmode`). The
    /// walsender's session writes dates in ISO and UTC, so values decode the same whatever the
    /// server's defaults.
    pub async fn connect(settings: &Settings) -> Result<Replication, StreamError> {
        let mut last = None;
        let ports = settings.get_ports();
        for (i, host) in settings.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            // libpq's order: `allow` tries unencrypted first, `prefer` TLS first (when offered);
            // each tries the other way when the server refused the first. Unix sockets never
            // use TLS.
            let mode = if matches!(host, Host::Unix(_)) { SslMode::Disable } else { settings.tls().mode() };
            let first = match mode {
                SslMode::Disable | SslMode::Allow => Encrypt::Never,
                SslMode::Prefer => Encrypt::IfOffered,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Encrypt::Always,
            };
            let attempt = match Replication::attempt(settings, host, port, first).await {
                Err(Attempt::Refused { encrypted: false, .. }) if mode == SslMode::Allow => {
                    Replication::attempt(settings, host, port, Encrypt::Always).await
                }
                Err(Attempt::Refused { encrypted: true, .. }) if mode == SslMode::Prefer => {
                    Replication::attempt(settings, host, port, Encrypt::Never).await
                }
                other => other,
            };
            match attempt {
                // libpq's `target_session_attrs=read-write`: a standby of a multi-host string is
                // passed over, so the stream follows the primary the other connections reach
                Ok(mut conn) if settings.get_target_session_attrs() == TargetSessionAttrs::ReadWrite => {
                    let read_only = conn.query("SHOW transaction_read_only").await?;
                    if read_only.first().and_then(|row| row.first()).and_then(Option::as_deref) != Some("on") {
                        return Ok(conn);
                    }
                    last = Some(io::Error::other(format!("host {host:?} port {port} is read-only (a standby)")));
                }
                Ok(conn) => return Ok(conn),
                Err(Attempt::Unreachable(e)) => last = Some(e),
                Err(Attempt::Refused { error, .. } | Attempt::Failed(error)) => return Err(error),
            }
        }
        Err(StreamError::Io(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no host to connect to"))))
    }

    /// One connection to `host`, encrypted as `encrypt` says.
    async fn attempt(settings: &Settings, host: &Host, port: u16, encrypt: Encrypt) -> Result<Replication, Attempt> {
        let timeout = settings.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
        let socket = match tokio::time::timeout(timeout, open(host, port)).await {
            Ok(Ok(socket)) => socket,
            Ok(Err(e)) => return Err(Attempt::Unreachable(e)),
            Err(_) => {
                return Err(Attempt::Unreachable(io::Error::new(io::ErrorKind::TimedOut, "connecting timed out")));
            }
        };
        let (socket, encrypted) = negotiate(socket, host, settings, encrypt).await.map_err(Attempt::Failed)?;
        let mut conn =
            Replication { socket: Some(socket), read: BytesMut::with_capacity(64 * 1024), write: BytesMut::new() };
        match conn.start_up(settings).await {
            Ok(()) => Ok(conn),
            Err(error @ StreamError::Server { .. }) => Err(Attempt::Refused { error, encrypted }),
            Err(error) => Err(Attempt::Failed(error)),
        }
    }

    async fn start_up(&mut self, settings: &Settings) -> Result<(), StreamError> {
        let user = settings.get_user().ok_or_else(|| StreamError::Protocol("no user name to connect as".into()))?;
        let dbname = settings.get_dbname().unwrap_or(user);
        let app = application_name(settings);
        let params = [
            ("user", user),
            ("database", dbname),
            ("replication", "database"),
            ("application_name", app),
            ("options", "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=postgres"),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write)?;
        self.flush().await?;
        let password = settings.get_password();
        let binding = settings.get_channel_binding();
        let end_point = self.socket.as_ref().and_then(|s| s.end_point()).filter(|_| binding != Binding::Disable);
        let unbound = || {
            if binding == Binding::Require {
                Err(StreamError::Protocol("channel_binding=require, but the server authenticated without it".into()))
            } else {
                Ok(())
            }
        };
        let mut scram: Option<ScramSha256> = None;
        let mut bound = false;
        loop {
            let frame = self.frame_or_error().await?;
            match frame.tag {
                b'R' => {
                    let mut body = frame.body;
                    if body.len() < 4 {
                        return Err(StreamError::Protocol("short authentication request".into()));
                    }
                    let code = body.get_i32();
                    let need = || StreamError::Protocol("the server asks for a password and none is configured".into());
                    match code {
                        0 if !bound => unbound()?,
                        0 => {}
                        3 => {
                            unbound()?;
                            frontend::password_message(password.ok_or_else(need)?, &mut self.write)?;
                            self.flush().await?;
                        }
                        5 => {
                            unbound()?;
                            if body.len() < 4 {
                                return Err(StreamError::Protocol("short MD5 salt".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(user.as_bytes(), password.ok_or_else(need)?, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.write)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechanisms: Vec<&[u8]> = body[..].split(|&b| b == 0).collect();
                            let plus = mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
                            let (mechanism, channel) = match end_point.clone() {
                                Some(hash) if plus => {
                                    (sasl::SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash))
                                }
                                Some(_) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
                                None => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                            };
                            if mechanism == sasl::SCRAM_SHA_256 {
                                if !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                                    return Err(StreamError::Protocol(
                                        "the server offers no SASL mechanism this client has".into(),
                                    ));
                                }
                                unbound()?;
                            }
                            bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
                            let s = ScramSha256::new(password.ok_or_else(need)?, channel);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut self.write)?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| StreamError::Protocol("SASL out of order".into()))?;
                            s.update(&body)?;
                            frontend::sasl_response(s.message(), &mut self.write)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| StreamError::Protocol("SASL out of order".into()))?;
                            s.finish(&body)?;
                        }
                        other => {
                            return Err(StreamError::Protocol(format!("unsupported authentication method {other}")));
                        }
                    }
                }
                b'Z' => return Ok(()),
                // parameter status, backend key data
                b'S' | b'K' => {}
                other => {
                    return Err(StreamError::Protocol(format!("unexpected message {:?} at start-up", other as char)));
                }
            }
        }
    }
}

/// How a connection attempt encrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encrypt {
    Never,
    /// When the server offers TLS.
    IfOffered,
    Always,
}

/// Why a connection attempt failed.
enum Attempt {
    /// The host could not be reached: the next one is tried.
    Unreachable(io::Error),
    /// The server refused the session, which was `encrypted` or not: libpq's `allow` and
    /// `prefer` then try the other way.
    Refused { error: StreamError, encrypted: bool },
    /// Anything else.
    Failed(StreamError),
}

/// TLS as `encrypt` asks: the request to the server (or, with `sslnegotiation=direct`, the
/// handshake at once), then the handshake. Says whether the socket is encrypted.
async fn negotiate(
    mut socket: Box<dyn Socket>,
    host: &Host,
    settings: &Settings,
    encrypt: Encrypt,
) -> Result<(Box<dyn Socket>, bool), StreamError> {
    let Host::Tcp(name) = host else { return Ok((socket, false)) };
    if encrypt == Encrypt::Never {
        return Ok((socket, false));
    }
    if settings.get_ssl_negotiation() != SslNegotiation::Direct {
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        socket.write_all(&request).await?;
        socket.flush().await?;
        match socket.read_u8().await? {
            b'S' => {}
            b'N' if encrypt == Encrypt::IfOffered => return Ok((socket, false)),
            b'N' => {
                let failure = crate::db::TlsFailure::ServerWithoutTls { mode: settings.tls().mode() };
                return Err(StreamError::Tls(failure.to_string()));
            }
            other => {
                return Err(StreamError::Protocol(format!("unexpected answer {:?} to the TLS request", other as char)));
            }
        }
    }
    match crate::db::handshake(socket, name, settings.tls()).await {
        Ok(tls) => Ok((Box::new(tls), true)),
        Err(e) => Err(StreamError::Tls(match settings.tls().failure(&*e) {
            Some(failure) if !e.is::<TlsSetupError>() => failure.to_string(),
            _ => error_text(&*e),
        })),
    }
}

/// An error and its causes, `: `-separated.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

async fn open(host: &Host, port: u16) -> io::Result<Box<dyn Socket>> {
    match host {
        Host::Tcp(name) => {
            let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok(Box::new(tokio::net::UnixStream::connect(path).await?))
        }
    }
}
