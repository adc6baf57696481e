//! A logical replication connection: the start-up and authentication of the PostgreSQL wire
//! protocol with `replication=database`, simple queries, and the copy-both stream of
//! `START_REPLICATION` with its standby status updates.
//!
//! tokio-postgres cannot run the copy-both sub-protocol, so this speaks the few messages it
//! needs itself, with the framing and authentication helpers of `postgres-protocol`.

mod connect;

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::db::Settings;
use connect::Socket;

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
