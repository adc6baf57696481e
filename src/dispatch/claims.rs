//! The in-flight claims: which ledger rows this daemon has read and not yet settled, so that no
//! row is dispatched twice however the reads that find it overlap.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::POISONED;

/// Ledger ids this daemon has claimed: fetched and not yet acknowledged (or handed back). An id
/// is never dispatched twice.
///
/// A fetch's snapshot may predate an acknowledgement that commits while the fetch runs; such an
/// event comes back still pending although it is done. So acknowledged ids are kept, stamped
/// with the ack epoch (acknowledgement commits so far), until every fetch that could have missed
/// them has claimed its rows: a fetch that started at epoch `e` treats ids acknowledged at epoch
/// `e` or later as known.
#[derive(Default)]
pub(crate) struct InFlight {
    state: Mutex<Claims>,
}

#[derive(Default)]
struct Claims {
    pending: HashSet<i64>,
    acked: HashMap<i64, u64>,
    epoch: u64,
}

impl InFlight {
    /// The epoch to note before a fetch.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.lock().expect(POISONED).epoch
    }

    /// Claims the ledger rows read by a fetch that started at `epoch`; returns the rows newly
    /// claimed and the number of events already known.
    pub(crate) fn claim<R>(&self, epoch: u64, rows: Vec<R>, id: impl Fn(&R) -> (i64, usize)) -> (Vec<R>, usize) {
        let mut s = self.state.lock().expect(POISONED);
        s.acked.retain(|_, at| *at >= epoch);
        let mut known = 0;
        let mut fresh = Vec::with_capacity(rows.len());
        for row in rows {
            let (row_id, events) = id(&row);
            if s.acked.contains_key(&row_id) || !s.pending.insert(row_id) {
                known += events;
            } else {
                fresh.push(row);
            }
        }
        (fresh, known)
    }

    /// Records that `acks` were committed and `handed_back` were released.
    pub(super) fn settle(&self, acks: &[i64], handed_back: &[i64]) {
        let mut s = self.state.lock().expect(POISONED);
        let epoch = s.epoch;
        for id in acks {
            s.pending.remove(id);
            s.acked.insert(*id, epoch);
        }
        for id in handed_back {
            s.pending.remove(id);
        }
        s.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    /// Rows as (ledger id, events).
    fn claim(in_flight: &InFlight, epoch: u64, rows: &[(i64, usize)]) -> (Vec<i64>, usize) {
        let (fresh, known) = in_flight.claim(epoch, rows.to_vec(), |r| *r);
        (fresh.into_iter().map(|(id, _)| id).collect(), known)
    }

    #[test]
    fn a_row_is_claimed_once_however_often_it_is_read() {
        let f = InFlight::default();
        let e = f.epoch();
        assert_eq!(claim(&f, e, &[(1, 1), (2, 3)]), (vec![1, 2], 0));
        // read again (a gap lookup, the sweep) while in flight: known, its events counted
        assert_eq!(claim(&f, e, &[(2, 3), (3, 1)]), (vec![3], 3));
    }

    #[test]
    fn a_fetch_that_started_before_an_acknowledgement_does_not_claim_the_row_again() {
        let f = InFlight::default();
        assert_eq!(claim(&f, f.epoch(), &[(1, 2)]), (vec![1], 0));
        // a fetch starts, then the acknowledgement of row 1 commits while it runs: its snapshot
        // may still show row 1 pending
        let started = f.epoch();
        f.settle(&[1], &[]);
        assert_eq!(claim(&f, started, &[(1, 2)]), (vec![], 2));
        // a fetch that started after the acknowledgement cannot see it pending; the note of
        // it is let go, and a row of that id read again later is new
        let later = f.epoch();
        assert_eq!(claim(&f, later, &[]), (vec![], 0));
        assert_eq!(claim(&f, later, &[(1, 2)]), (vec![1], 0));
    }

    #[test]
    fn a_handed_back_row_is_claimed_again_by_the_next_read() {
        let f = InFlight::default();
        assert_eq!(claim(&f, f.epoch(), &[(7, 1)]), (vec![7], 0));
        f.settle(&[], &[7]);
        assert_eq!(claim(&f, f.epoch(), &[(7, 1)]), (vec![7], 0));
    }
}
