//! A transaction too big to hold in memory: its messages are written, as the stream sends them,
//! to an unnamed temporary file (in `TMPDIR`, gone when closed, even after a crash), and read
//! back one at a time once it commits.
//!
//! pgoutput sends a transaction only once it has committed, but it sends all of it before the
//! commit message: without this, a million-row `INSERT … SELECT` would be a million events in
//! memory before the first could be delivered.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};

/// Where an open transaction's messages go once it holds too much.
pub(crate) struct Spill {
    file: BufWriter<File>,
    /// Messages written.
    count: u64,
}

impl Spill {
    pub(crate) fn new() -> io::Result<Spill> {
        Ok(Spill { file: BufWriter::with_capacity(1 << 16, tempfile::tempfile()?), count: 0 })
    }

    /// Keeps one message and its WAL position.
    pub(crate) fn push(&mut self, lsn: u64, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("a message over 4 GiB"))?;
        self.file.write_all(&lsn.to_le_bytes())?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(payload)?;
        self.count += 1;
        Ok(())
    }

    /// How many messages it holds.
    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    /// The messages, from the first.
    pub(crate) fn replay(self) -> io::Result<Replay> {
        let mut file = self.file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.rewind()?;
        Ok(Replay { file: BufReader::with_capacity(1 << 16, file), left: self.count, buf: Vec::new() })
    }
}

/// A spilled transaction read back.
pub(crate) struct Replay {
    file: BufReader<File>,
    left: u64,
    buf: Vec<u8>,
}

impl Replay {
    /// The next message and its WAL position; `None` after the last.
    pub(crate) fn next(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut head = [0u8; 12];
        self.file.read_exact(&mut head)?;
        let (lsn, len) = head.split_at(8);
        let lsn = u64::from_le_bytes(lsn.try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        self.buf.resize(len, 0);
        self.file.read_exact(&mut self.buf)?;
        self.left -= 1;
        Ok(Some((lsn, &self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_in_order_with_their_positions() {
        let mut spill = Spill::new().expect("temporary file");
        let big = vec![7u8; 200_000];
        spill.push(10, b"first").expect("write");
        spill.push(20, b"").expect("write");
        spill.push(30, &big).expect("write");
        assert_eq!(spill.len(), 3);
        let mut replay = spill.replay().expect("rewind");
        assert_eq!(replay.next().expect("read"), Some((10, &b"first"[..])));
        assert_eq!(replay.next().expect("read"), Some((20, &b""[..])));
        assert_eq!(replay.next().expect("read"), Some((30, &big[..])));
        assert_eq!(replay.next().expect("read"), None);
    }
}
