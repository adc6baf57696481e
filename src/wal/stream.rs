//! A logical replication connection: the start-up and authentication of the PostgreSQL wire
//! protocol with `replication=database`, simple queries, and the copy-both stream of
//! `START_REPLICATION` with its standby status updates.
//!
//! tokio-postgres cannot run the copy-both sub-protocol, so this speaks the few messages it
//! needs itself, with the framing and authentication helpers of `postgres-protocol`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;

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
}

impl StreamError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            StreamError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket with the runtime's hands off it, in blocking mode.
    fn into_blocking(self: Box<Self>) -> io::Result<socket2::Socket>;
}

impl Socket for tokio::net::TcpStream {
    fn into_blocking(self: Box<Self>) -> io::Result<socket2::Socket> {
        blocking((*self).into_std()?.into())
    }
}

impl Socket for tokio::net::UnixStream {
    fn into_blocking(self: Box<Self>) -> io::Result<socket2::Socket> {
        blocking((*self).into_std()?.into())
    }
}

fn blocking(socket: socket2::Socket) -> io::Result<socket2::Socket> {
    socket.set_nonblocking(false)?;
    Ok(socket)
}

/// What has arrived on `socket`, without waiting: `WouldBlock` when nothing has.
fn read_ready(socket: &socket2::Socket, buf: &mut [u8]) -> io::Result<usize> {
    nix::sys::socket::recv(socket.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// The streaming half of a started connection: a thread reads the socket and hands over what
/// it read in chunks; status updates are written from the blocking pool.
struct Streaming {
    socket: Arc<socket2::Socket>,
    chunks: mpsc::Receiver<io::Result<BytesMut>>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // wakes the reading thread out of its read: it sees the end and exits
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The largest read the streaming thread makes at once.
const CHUNK: usize = 256 * 1024;
/// Chunks read ahead of the consumer before the thread waits (and the server with it).
const CHUNKS_AHEAD: usize = 8;
/// How long a status update may wait for room in the socket before the stream counts as lost.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The streaming thread: reads until the socket ends or the consumer goes. After the first
/// bytes of a quiet stream it waits `pause`, then takes whatever arrived meanwhile in the same
/// chunk: the server writes a transaction's begin, changes and commit as separate messages, and
/// one wake-up (here and in the consumer) then covers all of them and the transactions behind.
fn pump(socket: &socket2::Socket, chunks: &mpsc::Sender<io::Result<BytesMut>>, pause: Duration) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut n = match (&*socket).read(&mut buf) {
            Ok(0) => {
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection");
                let _ = chunks.blocking_send(Err(eof));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = chunks.blocking_send(Err(e));
                return;
            }
        };
        let mut failed = None;
        if n < CHUNK && !pause.is_zero() {
            std::thread::sleep(pause);
            while n < CHUNK {
                match read_ready(socket, &mut buf[n..]) {
                    // the end: the next blocking read reports it
                    Ok(0) => break,
                    Ok(m) => n += m,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if chunks.blocking_send(Ok(BytesMut::from(&buf[..n]))).is_err() {
            return;
        }
        if let Some(e) = failed {
            let _ = chunks.blocking_send(Err(e));
            return;
        }
    }
}

/// One backend message: its type byte and body.
struct Frame {
    tag: u8,
    body: BytesMut,
}

/// A replication connection.
pub struct Replication {
    /// Until the stream starts; then `streaming`.
    socket: Option<Box<dyn Socket>>,
    streaming: Option<Streaming>,
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
    /// Connects to the first host of `config` that answers, as a logical replication client of
    /// its database. The walsender's session writes dates in ISO and UTC, so values decode the
    /// same whatever the server's defaults.
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Replication, StreamError> {
        let timeout = config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
        let mut last = None;
        let ports = config.get_ports();
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let socket: io::Result<Box<dyn Socket>> = match tokio::time::timeout(timeout, open(host, port)).await {
                Ok(s) => s,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connecting timed out")),
            };
            match socket {
                Ok(socket) => {
                    let mut conn = Replication {
                        socket: Some(socket),
                        streaming: None,
                        read: BytesMut::with_capacity(64 * 1024),
                        write: BytesMut::new(),
                    };
                    conn.start_up(config).await?;
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(StreamError::Io(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no host to connect to"))))
    }

    async fn start_up(&mut self, config: &tokio_postgres::Config) -> Result<(), StreamError> {
        let user = config.get_user().ok_or_else(|| StreamError::Protocol("no user name to connect as".into()))?;
        let dbname = config.get_dbname().unwrap_or(user);
        let app = config.get_application_name().unwrap_or("post-save wal");
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
        let password = config.get_password();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                b'R' => {
                    let mut body = frame.body;
                    if body.len() < 4 {
                        return Err(StreamError::Protocol("short authentication request".into()));
                    }
                    let code = body.get_i32();
                    let need = || StreamError::Protocol("the server asks for a password and none is configured".into());
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(password.ok_or_else(need)?, &mut self.write)?;
                            self.flush().await?;
                        }
                        5 => {
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
                            if !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                                return Err(StreamError::Protocol(
                                    "the server offers no SASL mechanism this client has".into(),
                                ));
                            }
                            let s = ScramSha256::new(password.ok_or_else(need)?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.write)?;
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

    /// Starts streaming `slot` from `from` with pgoutput for `publication`; after this, only
    /// [`Replication::next`] and [`Replication::confirm`] may be used. From here a thread of its
    /// own reads the socket; `pause` is how long it lets a quiet stream gather after its first
    /// bytes (zero: hand over each read as it comes).
    pub async fn start(
        &mut self,
        slot: &str,
        publication: &str,
        from: u64,
        pause: Duration,
    ) -> Result<(), StreamError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')",
            crate::name::quote_ident(slot),
            format_lsn(from),
            crate::name::quote_literal(&crate::name::quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let frame = self.frame_or_error().await?;
            match frame.tag {
                b'W' => return self.hand_to_thread(pause),
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

    fn hand_to_thread(&mut self, pause: Duration) -> Result<(), StreamError> {
        let socket = self.socket.take().ok_or_else(|| StreamError::Protocol("the stream is already started".into()))?;
        let socket = Arc::new(socket.into_blocking()?);
        socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let (tx, chunks) = mpsc::channel(CHUNKS_AHEAD);
        let reading = Arc::clone(&socket);
        std::thread::Builder::new().name("post-save-wal".into()).spawn(move || pump(&reading, &tx, pause))?;
        self.streaming = Some(Streaming { socket, chunks });
        Ok(())
    }

    /// The next message of the stream.
    pub async fn next(&mut self) -> Result<Copied, StreamError> {
        loop {
            let frame = self.frame_or_error().await?;
            match frame.tag {
                b'd' => {
                    let mut body = frame.body;
                    if body.is_empty() {
                        continue;
                    }
                    let kind = body.get_u8();
                    match kind {
                        b'w' if body.len() >= 24 => {
                            let start = body.get_u64();
                            let _end = body.get_u64();
                            let _sent = body.get_i64();
                            return Ok(Copied::Data { start, payload: body });
                        }
                        b'k' if body.len() >= 17 => {
                            let wal_end = body.get_u64();
                            let _sent = body.get_i64();
                            let reply = body.get_u8() == 1;
                            return Ok(Copied::Keepalive { wal_end, reply });
                        }
                        other => {
                            return Err(StreamError::Protocol(format!("unknown copy message {:?}", other as char)));
                        }
                    }
                }
                b'c' => return Err(StreamError::Protocol("the server ended the replication stream".into())),
                b'N' => {}
                other => {
                    return Err(StreamError::Protocol(format!("unexpected message {:?} in the stream", other as char)));
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

    async fn flush(&mut self) -> io::Result<()> {
        if let Some(socket) = self.socket.as_mut() {
            socket.write_all(&self.write).await?;
            self.write.clear();
            return socket.flush().await;
        }
        let streaming = self.streaming.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        let socket = Arc::clone(&streaming.socket);
        let bytes = std::mem::take(&mut self.write);
        tokio::task::spawn_blocking(move || (&*socket).write_all(&bytes)).await.map_err(io::Error::other)?
    }

    /// The next message; an `ErrorResponse` becomes an error.
    async fn frame_or_error(&mut self) -> Result<Frame, StreamError> {
        let frame = self.frame().await?;
        if frame.tag == b'E' { Err(server_error(&frame.body)) } else { Ok(frame) }
    }

    async fn frame(&mut self) -> Result<Frame, StreamError> {
        loop {
            if self.read.len() >= 5 {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if len < 4 {
                    return Err(StreamError::Protocol("a message with a bad length".into()));
                }
                if self.read.len() > len {
                    let mut frame = self.read.split_to(len + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok(Frame { tag, body: frame });
                }
                self.read.reserve(len + 1 - self.read.len());
            }
            if let Some(streaming) = self.streaming.as_mut() {
                match streaming.chunks.recv().await {
                    Some(Ok(chunk)) if self.read.is_empty() => self.read = chunk,
                    Some(Ok(chunk)) => self.read.extend_from_slice(&chunk),
                    Some(Err(e)) => return Err(StreamError::Io(e)),
                    None => return Err(StreamError::Io(io::Error::other("the stream's reading thread ended"))),
                }
                continue;
            }
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
        }
    }
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

/// `0/16B3A58`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Reads `0/16B3A58`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
