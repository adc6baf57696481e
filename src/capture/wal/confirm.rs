//! Which position the slot may be confirmed to: only past transactions every handler is done with.

use std::collections::VecDeque;

use crate::dispatch::Settled;

/// A transaction dispatched and not yet confirmed.
#[derive(Debug)]
pub(crate) struct Pending {
    end_lsn: u64,
    /// Its commit time (microseconds since 2000-01-01).
    commit_time: i64,
    /// Its parts still out: each batch of its events, and its reader while it dispatches them.
    waiting: u32,
}

/// Transactions dispatched and not yet confirmed, in commit order.
#[derive(Default)]
pub(crate) struct Confirmations {
    pub(crate) queue: VecDeque<Pending>,
    /// Everything up to here is consumed.
    pub(crate) confirmed: u64,
    /// The commit time of the last transaction confirmed with events in it.
    pub(crate) confirmed_commit: Option<i64>,
    /// A transaction was handed back: nothing after it may be confirmed in this session.
    pub(crate) stuck: bool,
    pub(crate) dirty: bool,
}

impl Confirmations {
    /// A committed transaction: done already, or waiting for one settlement.
    pub(crate) fn push(&mut self, end_lsn: u64, commit_time: i64, done: bool) {
        self.queue.push_back(Pending { end_lsn, commit_time, waiting: u32::from(!done) });
        self.advance();
    }

    /// One more settlement the last transaction waits for: another batch of its events.
    pub(crate) fn hold(&mut self, end_lsn: u64) {
        match self.queue.back_mut() {
            Some(last) if last.end_lsn == end_lsn && last.waiting > 0 => last.waiting += 1,
            _ => unreachable!("a batch of a transaction that is not the open one"),
        }
    }

    pub(crate) fn settle(&mut self, s: Settled) {
        if s.handed_back {
            self.stuck = true;
        }
        if let Some(entry) = self.waiting_for(s.key) {
            entry.waiting -= 1;
        }
        self.advance();
    }

    /// The first transaction ending at `end_lsn` that still waits for a settlement. The queue is
    /// in commit order, so the end positions rise and a binary search finds it: the reader's
    /// own settlement is for the newest transaction, at the back of a queue that holds up to
    /// `max_in_flight` of them while a backlog drains. A linear search stays as the fallback, so
    /// a queue out of order would only cost time.
    fn waiting_for(&mut self, end_lsn: u64) -> Option<&mut Pending> {
        let at = self.queue.partition_point(|p| p.end_lsn < end_lsn);
        let found = self.queue.range(at..).take_while(|p| p.end_lsn == end_lsn).position(|p| p.waiting > 0);
        match found {
            Some(i) => self.queue.get_mut(at + i),
            None => self.queue.iter_mut().find(|p| p.end_lsn == end_lsn && p.waiting > 0),
        }
    }

    fn advance(&mut self) {
        if self.stuck {
            return;
        }
        while let Some(&Pending { end_lsn, commit_time, waiting: 0 }) = self.queue.front() {
            self.queue.pop_front();
            if end_lsn > self.confirmed {
                self.confirmed = end_lsn;
                self.confirmed_commit = Some(commit_time);
                self.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(end_lsn: u64) -> Settled {
        Settled { key: end_lsn, handed_back: false }
    }

    #[test]
    fn only_a_fully_settled_prefix_is_confirmed() {
        let mut c = Confirmations::default();
        c.push(10, 10, false);
        c.push(20, 20, false);
        c.push(30, 30, true);
        c.settle(settled(20));
        assert_eq!(c.confirmed, 0);
        c.settle(settled(10));
        assert_eq!(c.confirmed, 30);
        assert_eq!(c.confirmed_commit, Some(30), "the commit time of the last confirmed transaction");
        c.push(40, 40, false);
        c.settle(Settled { key: 40, handed_back: true });
        c.push(50, 50, true);
        assert_eq!(c.confirmed, 30, "a handed-back transaction stops confirmation");
    }

    #[test]
    fn a_transaction_in_batches_is_confirmed_after_its_last_batch_and_its_reader() {
        let mut c = Confirmations::default();
        c.push(10, 10, false);
        c.hold(10);
        c.settle(settled(10));
        c.hold(10);
        assert_eq!(c.confirmed, 0, "its reader still holds it, one batch is out");
        c.settle(settled(10));
        assert_eq!(c.confirmed, 0, "its reader still holds it");
        c.settle(settled(10));
        assert_eq!(c.confirmed, 10);
        c.settle(settled(10));
        assert_eq!(c.confirmed, 10, "a settlement too many changes nothing");
    }

    #[test]
    fn settlements_in_any_order_confirm_exactly_the_settled_prefix() {
        let mut c = Confirmations::default();
        for lsn in 1..=1000 {
            c.push(lsn * 10, lsn as i64, false);
        }
        // the newest first (the reader's own settlement), then the rest from the back
        for lsn in (2..=1000).rev() {
            c.settle(settled(lsn * 10));
            assert_eq!(c.confirmed, 0, "the oldest is still out");
        }
        c.settle(settled(10));
        assert_eq!(c.confirmed, 10_000);
        assert!(c.queue.is_empty());
    }

    #[test]
    fn a_queue_out_of_order_still_finds_its_transaction() {
        let mut c = Confirmations::default();
        c.push(30, 30, false);
        c.push(10, 10, false);
        c.push(20, 20, false);
        c.settle(settled(10));
        c.settle(settled(20));
        assert_eq!(c.confirmed, 0);
        c.settle(settled(30));
        assert_eq!(c.confirmed, 30);
        assert!(c.queue.is_empty());
    }
}
