//! Dispatch: from a batch of saves to the handlers registered for them, and back to the
//! source once they are done.
//!
//! A capture source hands over a [`Batch`]: its events, the in-flight permit it holds, and a
//! [`Completion`] that says whom to tell when every handler has finished with the events. The
//! [`router`] puts each event on its handlers' row lanes; [`delivery`] runs one handler on one
//! event with timeouts and retries; [`outcome`] writes acknowledgements and dead letters in
//! batches and tells the source; [`retry`] runs the retries operators ask for. Nothing here
//! names a capture source or a handler kind.

pub(crate) mod claims;
pub(crate) mod delivery;
pub(crate) mod lanes;
pub(crate) mod outcome;
pub(crate) mod retry;
pub(crate) mod router;

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::event::SaveEvent;

/// A lock is poisoned only by a panic while it was held: a bug, said loudly rather than
/// leaving claimed rows or queued events stranded without a word.
pub(crate) const POISONED: &str = "a lock poisoned by an earlier panic (a bug in post-save)";

/// The handler name of dead letters kept for saves no handler could receive: a table published
/// for the WAL capture that no watch names (`post-save dead retry --handler '(unwatched)'`).
pub(crate) const UNWATCHED: &str = "(unwatched)";

/// Saves handed to dispatch together: they are done when every handler has finished with every
/// one of them.
pub(crate) struct Batch {
    pub events: Vec<SaveEvent>,
    /// In-flight room, held until the batch is done.
    pub permit: OwnedSemaphorePermit,
    pub completion: Completion,
}

/// Whom a batch's end is told to.
#[derive(Debug, Clone)]
pub(crate) enum Completion {
    /// Nobody: the source keeps nothing to acknowledge.
    None,
    /// The ledger row of this id is acknowledged (or, when handed back, left pending).
    Ack(i64),
    /// The source hears once the batch's dead letters are durable.
    Notify(Notice),
}

/// Where a source hears that a batch is settled.
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    /// The source's own name for the batch.
    pub key: u64,
    pub to: mpsc::UnboundedSender<Settled>,
}

/// A batch settled: every handler finished (or, `handed_back`, a stopping daemon left some of
/// it undelivered, or its dead letters could not be written).
#[derive(Debug)]
pub(crate) struct Settled {
    pub key: u64,
    pub handed_back: bool,
}
