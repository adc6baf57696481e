//! A logical replication connection: the start-up and authentication of the PostgreSQL wire
//! protocol with `replication=database`, simple queries, and the copy-both stream of
//! `START_REPLICATION` with its standby status updates.
//!
//! tokio-postgres cannot run the copy-both sub-protocol, so this speaks the few messages it
//! needs itself, with the framing and authentication helpers of `postgres-protocol`.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding as Binding, Host, SslNegotiation, TargetSessionAttrs};

use crate::db::{Settings, SslMode, TlsSetupError};

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The socket failed or closed.
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// The server sent an error.
    #[error("replication connection: {severity} {code}: {message}")]
    Server {
        /// ERROR, FATAL…
        severity: String,
        /// SQLSTATE.
        code: String,
        /// The message.
        message: String,
    },
    /// The server said something this client does not expect.
    #[error("replication connection: {0}")]
    Protocol(String),
    /// TLS failed, in the user's words (see [`crate::db::TlsFailure`]).
    #[error("replication connection: {0}")]
    Tls(String),
}

impl StreamError {
    /// The SQLSTATE of a server error.
    #[cfg(test)]
    fn code(&self) -> Option<&str> {
        match self {
            StreamError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A connection's socket: TCP or Unix, encrypted or not.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
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

/// One backend message: its type byte and body.
struct Frame {
    tag: u8,
    body: BytesMut,
}

impl Frame {
    /// The frame, or the server's error when it is an `ErrorResponse`.
    fn or_error(self) -> Result<Frame, StreamError> {
        if self.tag == b'E' { Err(server_error(&self.body)) } else { Ok(self) }
    }
}

/// A replication connection.
pub struct Replication {
    socket: Option<Box<dyn Socket>>,
    read: BytesMut,
    write: BytesMut,
}

/// What the stream carries after `START_REPLICATION`.
#[derive(Debug)]
pub enum Copied {
    /// A decoded change's bytes (`XLogData`): where it starts in the WAL and its payload.
    Data {
        /// The WAL position of the message.
        start: u64,
        /// The pgoutput message.
        payload: BytesMut,
    },
    /// The server's keepalive: how far the WAL goes, and whether it wants an answer now.
    Keepalive {
        /// The end of the WAL on the server.
        wal_end: u64,
        /// Answer at once, or be disconnected after `wal_sender_timeout`.
        reply: bool,
    },
}

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

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

    /// Runs a simple query (a replication command or SQL) and returns its rows as text.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, StreamError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let frame = self.frame_or_error().await;
            let frame = match frame {
                Ok(f) => f,
                Err(e @ StreamError::Server { .. }) => {
                    failed = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match frame.tag {
                b'D' => rows.push(data_row(frame.body)?),
                b'Z' => return failed.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// Starts streaming `slot` from `from` with pgoutput for `publications`; after this, only
    /// [`Replication::next`] and [`Replication::confirm`] may be used. The stream is read
    /// through the runtime's socket as it comes, like the start-up.
    pub async fn start(&mut self, slot: &str, publications: &[&str], from: u64) -> Result<(), StreamError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')",
            crate::name::quote_ident(slot),
            format_lsn(from),
            crate::name::quote_literal(
                &publications.iter().map(|p| crate::name::quote_ident(p)).collect::<Vec<_>>().join(",")
            ),
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let frame = self.frame_or_error().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                other => {
                    return Err(StreamError::Protocol(format!(
                        "unexpected message {:?} starting replication",
                        other as char
                    )));
                }
            }
        }
    }

    /// The next message of the stream.
    pub async fn next(&mut self) -> Result<Copied, StreamError> {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            self.fill().await?;
        }
    }

    /// The next message of the stream when the bytes already read hold all of it; `None` when
    /// reading is needed first. Lets a caller take a whole read's messages in one go.
    pub fn try_next(&mut self) -> Option<Result<Copied, StreamError>> {
        loop {
            let frame = match self.buffered_frame()?.and_then(Frame::or_error) {
                Ok(f) => f,
                Err(e) => return Some(Err(e)),
            };
            match frame.tag {
                b'd' => {
                    let mut body = frame.body;
                    if body.is_empty() {
                        continue;
                    }
                    let kind = body.get_u8();
                    return Some(match kind {
                        b'w' if body.len() >= 24 => {
                            let start = body.get_u64();
                            let _end = body.get_u64();
                            let _sent = body.get_i64();
                            Ok(Copied::Data { start, payload: body })
                        }
                        b'k' if body.len() >= 17 => {
                            let wal_end = body.get_u64();
                            let _sent = body.get_i64();
                            let reply = body.get_u8() == 1;
                            Ok(Copied::Keepalive { wal_end, reply })
                        }
                        other => Err(StreamError::Protocol(format!("unknown copy message {:?}", other as char))),
                    });
                }
                b'c' => return Some(Err(StreamError::Protocol("the server ended the replication stream".into()))),
                b'N' => {}
                other => {
                    return Some(Err(StreamError::Protocol(format!(
                        "unexpected message {:?} in the stream",
                        other as char
                    ))));
                }
            }
        }
    }

    /// Tells the server that everything up to `lsn` is consumed: the slot may let that WAL go,
    /// and a restart streams from there.
    pub async fn confirm(&mut self, lsn: u64) -> Result<(), StreamError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(lsn);
        msg.put_u64(lsn);
        msg.put_u64(lsn);
        msg.put_i64(now - PG_EPOCH_OFFSET_US);
        msg.put_u8(0);
        frontend::CopyData::new(&msg[..])?.write(&mut self.write);
        self.flush().await?;
        Ok(())
    }

    /// Confirms `lsn` and ends the stream the way the protocol does (CopyDone both ways, then
    /// the command's completion), so the server has taken the confirmation in before the
    /// connection goes: a connection merely dropped while the server writes to it can end the
    /// server's session before it reads the last confirmation, and the next start then streams
    /// again what was delivered.
    pub async fn finish(&mut self, lsn: u64) -> Result<(), StreamError> {
        self.confirm(lsn).await?;
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        // what the server sent before it saw the CopyDone is dropped: the slot streams it again
        loop {
            let frame = self.frame_or_error().await?;
            if frame.tag == b'Z' {
                break;
            }
        }
        frontend::terminate(&mut self.write);
        self.flush().await?;
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        let socket = self.socket.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        socket.write_all(&self.write).await?;
        self.write.clear();
        socket.flush().await
    }

    /// The next message; an `ErrorResponse` becomes an error.
    async fn frame_or_error(&mut self) -> Result<Frame, StreamError> {
        self.frame().await.and_then(Frame::or_error)
    }

    async fn frame(&mut self) -> Result<Frame, StreamError> {
        loop {
            if let Some(frame) = self.buffered_frame() {
                return frame;
            }
            self.fill().await?;
        }
    }

    /// The first message in the bytes read, when they hold all of it.
    fn buffered_frame(&mut self) -> Option<Result<Frame, StreamError>> {
        if self.read.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
        if len < 4 {
            return Some(Err(StreamError::Protocol("a message with a bad length".into())));
        }
        if self.read.len() <= len {
            self.read.reserve(len + 1 - self.read.len());
            return None;
        }
        let mut frame = self.read.split_to(len + 1);
        let tag = frame[0];
        frame.advance(5);
        Some(Ok(Frame { tag, body: frame }))
    }

    /// Reads what the server has sent (waiting for it when nothing has come).
    async fn fill(&mut self) -> Result<(), StreamError> {
        let Some(socket) = self.socket.as_mut() else {
            return Err(StreamError::Io(io::Error::from(io::ErrorKind::NotConnected)));
        };
        if self.read.capacity() - self.read.len() < 8192 {
            self.read.reserve(64 * 1024);
        }
        if socket.read_buf(&mut self.read).await? == 0 {
            return Err(StreamError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
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

fn data_row(mut body: BytesMut) -> Result<Vec<Option<String>>, StreamError> {
    let short = || StreamError::Protocol("short data row".into());
    if body.len() < 2 {
        return Err(short());
    }
    let n = body.get_i16().max(0) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        out.push(Some(String::from_utf8_lossy(&body.split_to(len)).into_owned()));
    }
    Ok(out)
}

fn server_error(body: &[u8]) -> StreamError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        let Some((&kind, value)) = field.split_first() else { continue };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    StreamError::Server { severity, code, message }
}

/// The `application_name` the replication connection of `settings` gives itself: the one
/// configured, else `post-save wal` (how `doctor` tells the daemon's stream from another's).
pub(crate) fn application_name(settings: &Settings) -> &str {
    settings.get_application_name().unwrap_or("post-save wal")
}

/// `0/16B3A58`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `0/16B3A58`.
    fn parse_lsn(text: &str) -> Option<u64> {
        let (hi, lo) = text.split_once('/')?;
        Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
    }

    #[test]
    fn lsns_read_and_write_as_postgres_does() {
        assert_eq!(parse_lsn("0/16B3A58"), Some(0x16B_3A58));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_0010), "1/10");
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn server_errors_name_their_code() {
        let body = b"SERROR\0C55006\0Mreplication slot \"x\" is active for PID 7\0\0";
        let e = server_error(body);
        assert_eq!(e.code(), Some("55006"));
        assert!(e.to_string().contains("is active"), "{e}");
    }
}
