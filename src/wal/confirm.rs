//! Which position the slot may be confirmed to: only past transactions every handler is done with.

use std::collections::VecDeque;

use super::Settled;

/// Transactions dispatched and not yet confirmed, in commit order.
#[derive(Default)]
pub(crate) struct Confirmations {
    pub(crate) queue: VecDeque<(u64, bool)>,
    /// Everything up to here is consumed.
    pub(crate) confirmed: u64,
    /// A transaction was handed back: nothing after it may be confirmed in this session.
    pub(crate) stuck: bool,
    pub(crate) dirty: bool,
}

impl Confirmations {
    pub(crate) fn push(&mut self, end_lsn: u64, done: bool) {
        self.queue.push_back((end_lsn, done));
        self.advance();
    }

    pub(crate) fn settle(&mut self, s: Settled) {
        if s.handed_back {
            self.stuck = true;
        }
        if let Some(entry) = self.queue.iter_mut().find(|(lsn, _)| *lsn == s.end_lsn) {
            entry.1 = true;
        }
        self.advance();
    }

    fn advance(&mut self) {
        if self.stuck {
            return;
        }
        while let Some(&(lsn, true)) = self.queue.front() {
            self.queue.pop_front();
            if lsn > self.confirmed {
                self.confirmed = lsn;
                self.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fully_settled_prefix_is_confirmed() {
        let mut c = Confirmations::default();
        c.push(10, false);
        c.push(20, false);
        c.push(30, true);
        c.settle(Settled { end_lsn: 20, handed_back: false });
        assert_eq!(c.confirmed, 0);
        c.settle(Settled { end_lsn: 10, handed_back: false });
        assert_eq!(c.confirmed, 30);
        c.push(40, false);
        c.settle(Settled { end_lsn: 40, handed_back: true });
        c.push(50, true);
        assert_eq!(c.confirmed, 30, "a handed-back transaction stops confirmation");
    }
}
