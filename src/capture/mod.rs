//! Where saves come from: the capture sources. Each reads saves its own way and hands them to
//! [`crate::dispatch`] as batches, each with the completion its source wants to hear.
//!
//! * [`ledger`]: durable trigger captures. The session LISTENs for the doorbell, reads the
//!   ledger table `post_save.event` page by page behind a cursor that remembers gaps, and has
//!   each row acknowledged once its handlers are done.
//! * [`notify`]: notify-mode trigger captures, whose saves travel inside the NOTIFY itself (in
//!   parts when too big); nothing to acknowledge.
//! * [`wal`]: the write-ahead log through a logical replication slot; a transaction is
//!   confirmed to the slot once its handlers are done and its dead letters are written.
//!
//! A source names no handler kind: what happens to a save after it is handed over is
//! dispatch's business.

pub(crate) mod ledger;
pub(crate) mod notify;
pub mod wal;
