//! Where the live fetch stands in the ledger: the highest id seen, and the ids below it not seen
//! yet (gaps) that a transaction still open may fill.
//!
//! Writers take ledger ids from a sequence inside their transactions, so ids are taken in one
//! order and committed in another: the transaction that took id 1001 may commit long after the
//! row with id 2001 was read. Which transaction holds a gap is unknown until its row is seen, but
//! each fetch reads the snapshot its page was read with, and only a transaction that snapshot saw
//! running (or not yet begun) can fill a gap it left. The capture takes its transaction id
//! (`txid_current()`) before its ledger id, so every transaction that can fill a gap has an id
//! below the next transaction id of the fetch that found the gap: the gap's *horizon*. Then:
//!
//! * a gap is looked up only when a fetch's snapshot shows that a transaction below its horizon
//!   has ended since the last fetch's (two consecutive snapshots tell which ended), right after
//!   that fetch and before its page is dispatched. So a fetch costs what the transactions that
//!   ended since the last one cost, not what the number of gaps does: a gap held by a
//!   transaction open for an hour costs nothing until that transaction ends, and is read at the
//!   first fetch after it does. And a row's events keep their order: a later event of the same
//!   row (in the page) needs that transaction to have ended first. Only gaps behind the cursor
//!   are looked up so: one remembered at the start of the session above it is left to the pages
//!   (see [`Gaps::after_fetch`]);
//! * a gap is dropped once no transaction below its horizon can still run and it was looked up
//!   after they ended: the snapshot's xmin (every transaction of the cluster below it has ended)
//!   passed the horizon, or every transaction of this database below it had ended when last
//!   checked ([`Gaps::settle`]; one open in another database cannot fill this ledger's gaps).
//!   A rolled-back writer's id is dropped that way.
//!
//! Rows written some other way than by the capture (by hand, taking the ledger id first) may be
//! missed if they commit late; the sweep finds them.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::capture::ledger::query::Snapshot;
use crate::install::CHUNK;

/// At most this many gaps are remembered; when more appear, the ones with the oldest horizon
/// are given up on (left to the sweep): their transactions have been open longest, and newer
/// gaps are the ones most likely to be filled any moment.
const MAX_GAPS: usize = 10_000;

/// The live fetch's position: the highest ledger id seen, and the gaps below it.
pub(super) struct Cursor {
    pub after: i64,
    /// The last ledger id handed out when the session began (one step below the first id of a
    /// fresh ledger). Ids up to it that the catch-up does not see are history (handled, or left
    /// to the sweep), except those that [`Cursor::remember`] is given, which start as gaps; ids
    /// above it that are not seen are gaps, from the first fetch on. `None` when the sequence
    /// could not be read: then the first id seen is the boundary.
    pub floor: Option<i64>,
    pub gaps: Gaps,
    /// The database name, the events' `using`.
    pub using: String,
    /// Events per ledger row in the last page read, which sizes the next page.
    pub per_row: i64,
    /// When the transactions of this database were last listed for [`Gaps::settle`].
    pub settled_at: Instant,
}

/// What taking in one fetch did to the gaps.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Taken {
    /// Gaps that a transaction ended since the last fetch may have filled: to be looked up
    /// before the page is dispatched.
    pub due: usize,
    /// Gaps given up on, in ascending order: no transaction that could fill them is open.
    pub dropped: Vec<i64>,
}

impl Cursor {
    pub(super) fn new(floor: Option<i64>, using: String) -> Cursor {
        Cursor { after: 0, floor, gaps: Gaps::default(), using, per_row: 1, settled_at: Instant::now() }
    }

    /// Remembers `ids` (below the floor, no row holding them at `snapshot`) as gaps.
    pub(super) fn remember(&mut self, ids: &[i64], snapshot: Snapshot) {
        let horizon = snapshot.next;
        self.gaps.last = Some(snapshot);
        for &id in ids.iter().rev().take(MAX_GAPS).rev() {
            self.gaps.note(id, horizon);
        }
    }

    /// Takes in a fetch: `ids` are the ledger ids it read (any order), `snapshot` what it was
    /// read with. The gaps it makes due are then looked up ([`Gaps::due`], [`Gaps::looked_up`]).
    pub(super) fn take(&mut self, ids: &mut [i64], snapshot: Option<Snapshot>) -> Taken {
        ids.sort_unstable();
        // Start-of-session gaps may lie above `after`, so the page itself can fill them.
        for id in ids.iter() {
            self.gaps.seen(*id);
        }
        let horizon = snapshot.as_ref().map(|s| s.next);
        // Before the new gaps are noted: whatever ended before this snapshot, it was not what
        // holds them (their transactions were running, or rolled back). And before the cursor
        // moves: only gaps behind the page are looked up before it.
        let taken = self.gaps.after_fetch(snapshot, self.after);
        for &id in ids.iter() {
            self.advance(id, horizon);
        }
        taken
    }

    /// Moves past `id`, noting the ids skipped as gaps (with `horizon`; none without one).
    fn advance(&mut self, id: i64, horizon: Option<i64>) {
        if id <= self.after {
            return;
        }
        // Ledger ids step by CHUNK, so the ids not seen between the last one seen (at least the
        // floor; ids start at 1, so `after` 0 means none seen yet) and this one are gaps.
        let base = match (self.after, self.floor) {
            (0, floor) => floor,
            (after, floor) => Some(floor.map_or(after, |f| after.max(f))),
        };
        if let (Some(base), Some(horizon)) = (base, horizon)
            && id > base
        {
            let missing = (id - base) / CHUNK - 1;
            // When more are missing than can be remembered, the nearest to `id` are kept.
            let first = (missing - MAX_GAPS as i64).max(0) + 1;
            for k in first..=missing {
                self.gaps.note(base + k * CHUNK, horizon);
            }
        }
        self.after = id;
    }
}

/// The gaps, by id and by horizon.
#[derive(Default)]
pub(super) struct Gaps {
    horizon: HashMap<i64, i64>,
    /// (horizon, id): those that an ended transaction may have filled, and those that no running
    /// one can fill, are each one range of it.
    by_horizon: BTreeSet<(i64, i64)>,
    /// To be looked up before the page that made them due is dispatched.
    due: BTreeSet<i64>,
    /// The last fetch's snapshot.
    last: Option<Snapshot>,
    /// Every transaction of this database below this had ended at the last [`Gaps::settle`].
    settled: i64,
    /// Gaps given up on for want of room, this session.
    pub evicted: u64,
}

impl Gaps {
    pub(super) fn len(&self) -> usize {
        self.horizon.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.horizon.is_empty()
    }

    /// The gaps to look up, in ascending order.
    pub(super) fn due(&self) -> Vec<i64> {
        self.due.iter().copied().collect()
    }

    /// The due gaps were looked up, all of them, and the rows of `found` read.
    pub(super) fn looked_up(&mut self, found: &[i64]) {
        for &id in found {
            self.seen(id);
        }
        self.due.clear();
    }

    fn note(&mut self, id: i64, horizon: i64) {
        if self.horizon.contains_key(&id) {
            return;
        }
        if self.horizon.len() >= MAX_GAPS
            && let Some((_, oldest)) = self.by_horizon.first().copied()
        {
            self.seen(oldest);
            self.evicted += 1;
        }
        self.horizon.insert(id, horizon);
        self.by_horizon.insert((horizon, id));
    }

    fn seen(&mut self, id: i64) {
        if let Some(horizon) = self.horizon.remove(&id) {
            self.by_horizon.remove(&(horizon, id));
            self.due.remove(&id);
        }
    }

    /// After a fetch read with `now`, from past `behind` (the cursor before its page): the gaps
    /// up to `behind` that a transaction ended since the last fetch may have filled are due;
    /// those no open transaction can fill, and that were looked up since theirs ended, are
    /// dropped.
    ///
    /// A gap above `behind` (one remembered at the start of the session) is never due: the page
    /// and those after it read every committed row above the cursor, in id order. Looked up
    /// before them, its row would be dispatched ahead of earlier saves of the same table row
    /// that they have still to read. For the same reason it is dropped without a look-up once
    /// no open transaction can fill it.
    fn after_fetch(&mut self, now: Option<Snapshot>, behind: i64) -> Taken {
        let Some(now) = now else { return Taken::default() };
        let mut taken = Taken::default();
        if let Some(ended) = self.last.as_ref().and_then(|last| first_ended(last, &now)) {
            // Only a transaction below a gap's horizon can fill it.
            for &(_, id) in self.by_horizon.range((ended + 1, i64::MIN)..) {
                if id <= behind {
                    taken.due += usize::from(self.due.insert(id));
                }
            }
        }
        // A due gap was filled, if at all, before `now`: it is looked up once more first.
        let limit = now.xmin.max(self.settled);
        taken.dropped = self
            .by_horizon
            .range(..=(limit, i64::MAX))
            .map(|&(_, id)| id)
            .filter(|id| !self.due.contains(id))
            .collect();
        taken.dropped.sort_unstable();
        for &id in &taken.dropped {
            self.seen(id);
        }
        self.last = Some(now);
        taken
    }

    /// Takes in the 32-bit ids of the transactions of this database running now, read after
    /// the last fetch ([`crate::capture::ledger::query::local_xids`]). A transaction below the last fetch's
    /// next id that is not among them has ended, and an ended one that could have filled a gap
    /// was running at that fetch or an earlier one, so the fetches' snapshots have made the gap
    /// due (and it was looked up), or will at the next fetch, before it can be dropped.
    /// Transactions of other databases are left out: they cannot write this ledger.
    pub(super) fn settle(&mut self, local: &[u32]) {
        let Some(last) = &self.last else { return };
        let base = last.next;
        // The running ids are within 2^31 of the next one (PostgreSQL stops assigning ids
        // before they could wrap), so the difference in 32 bits, signed, is exact.
        let full = |xid: u32| base + i64::from(xid.wrapping_sub(base as u32) as i32);
        let oldest = local.iter().map(|&x| full(x)).min().map_or(base, |o| o.min(base));
        self.settled = self.settled.max(oldest);
    }
}

/// The lowest transaction id that `before` counted as running (or not begun) and `now` does
/// not: the oldest transaction that ended between the two snapshots.
fn first_ended(before: &Snapshot, now: &Snapshot) -> Option<i64> {
    let was_running = before.running.iter().copied().find(|&x| !now.runs(x));
    // Ids from `before.xmax` up to `now.xmax` have all been handed out; those `now` does not see
    // running have ended. At most `now.running.len() + 1` of them are looked at.
    let was_unseen = (before.xmax..now.xmax).find(|&x| !now.runs(x));
    was_running.into_iter().chain(was_unseen).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(xmin: i64, xmax: i64, running: &[i64], next: i64) -> Snapshot {
        Snapshot { xmin, xmax, running: running.to_vec(), next }
    }

    /// A cursor past id 1 of a fresh ledger, at `snapshot`.
    fn cursor_at(s: Snapshot) -> Cursor {
        let mut c = Cursor::new(Some(1 - CHUNK), "db".into());
        assert_eq!(c.take(&mut [1], Some(s)), Taken::default());
        c
    }

    #[test]
    fn a_gap_is_kept_while_its_transaction_runs_and_looked_up_once_it_ends() {
        // Transaction 100 took id 1001 and is open; 2001 was committed.
        let mut c = cursor_at(snapshot(100, 101, &[100], 105));
        assert_eq!(c.take(&mut [2001], Some(snapshot(100, 106, &[100], 106))), Taken::default());
        assert_eq!(c.gaps.due(), Vec::<i64>::new(), "nothing ended that could fill it");
        // Fetch after fetch while 100 runs and others come and go: never looked up, never dropped.
        for x in 106..200 {
            assert_eq!(c.take(&mut [], Some(snapshot(100, x + 1, &[100], x + 1))), Taken::default());
            assert_eq!(c.gaps.due(), Vec::<i64>::new(), "a gap held by a running transaction costs nothing");
        }
        assert_eq!(c.gaps.len(), 1);
        // 100 commits: the fetch that sees it ended has 1001 looked up, which finds it.
        assert_eq!(c.take(&mut [3001], Some(snapshot(201, 201, &[], 201))), Taken { due: 1, dropped: vec![] });
        assert_eq!(c.gaps.due(), vec![1001]);
        c.gaps.looked_up(&[1001]);
        assert!(c.gaps.is_empty());
        assert_eq!(c.after, 3001);
        assert_eq!(c.take(&mut [], Some(snapshot(201, 201, &[], 201))), Taken::default());
    }

    #[test]
    fn a_rolled_back_gap_is_looked_up_once_then_dropped() {
        let mut c = cursor_at(snapshot(100, 101, &[100], 105));
        c.take(&mut [2001], Some(snapshot(100, 106, &[100], 106)));
        // 100 rolls back: looked up (it is not there), then dropped by the next fetch.
        assert_eq!(c.take(&mut [], Some(snapshot(107, 107, &[], 107))), Taken { due: 1, dropped: vec![] });
        c.gaps.looked_up(&[]);
        assert_eq!(c.take(&mut [], Some(snapshot(107, 107, &[], 107))), Taken { due: 0, dropped: vec![1001] });
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn a_due_gap_is_not_dropped_before_it_was_looked_up() {
        let mut c = cursor_at(snapshot(100, 101, &[100], 105));
        c.take(&mut [2001], Some(snapshot(100, 106, &[100], 106)));
        c.take(&mut [], Some(snapshot(107, 107, &[], 107)));
        // The look-up did not happen (the session stopped, say): still due, still kept.
        assert_eq!(c.take(&mut [], Some(snapshot(108, 108, &[], 108))), Taken::default());
        assert_eq!(c.gaps.due(), vec![1001]);
        c.gaps.looked_up(&[]);
        assert_eq!(c.take(&mut [], Some(snapshot(108, 108, &[], 108))).dropped, vec![1001]);
    }

    #[test]
    fn a_transaction_that_began_after_the_last_snapshot_and_ended_before_this_one_is_seen_to_end() {
        // 120 was not running at the first snapshot (at or above its xmax), took id 1001 and
        // ended before the next: it is among the ids handed out in between that no longer run.
        let mut c = cursor_at(snapshot(110, 110, &[], 110));
        c.take(&mut [2001], Some(snapshot(110, 125, &[120], 125)));
        assert_eq!(c.take(&mut [], Some(snapshot(130, 130, &[], 130))).due, 1);
        assert_eq!(first_ended(&snapshot(110, 110, &[], 110), &snapshot(110, 125, &[110, 111, 113], 125)), Some(112));
        assert_eq!(first_ended(&snapshot(100, 110, &[100, 105], 110), &snapshot(100, 110, &[100, 105], 112)), None);
        assert_eq!(
            first_ended(&snapshot(100, 110, &[100, 105], 110), &snapshot(100, 112, &[100, 110, 111], 112)),
            Some(105)
        );
    }

    #[test]
    fn only_gaps_an_ended_transaction_could_fill_are_looked_up() {
        // A thousand gaps held back by transaction 100, open all along.
        let mut c = cursor_at(snapshot(100, 101, &[100], 101));
        c.take(&mut [1001 * CHUNK + 1], Some(snapshot(100, 101, &[100], 101)));
        assert_eq!(c.gaps.len(), 1000);
        // Transaction 150 takes id 1002001 and then ends with 100 running: only that gap
        // (horizon 201) is due, not the thousand (horizon 101).
        c.take(&mut [1003 * CHUNK + 1], Some(snapshot(100, 201, &[100, 150], 201)));
        let t = c.take(&mut [], Some(snapshot(100, 201, &[100], 201)));
        assert_eq!((t.due, c.gaps.due()), (1, vec![1002 * CHUNK + 1]));
        c.gaps.looked_up(&[1002 * CHUNK + 1]);
        // 100 ends: all of them are due, once, then dropped.
        assert_eq!(c.take(&mut [], Some(snapshot(201, 201, &[], 201))).due, 1000);
        c.gaps.looked_up(&[]);
        assert_eq!(c.take(&mut [], Some(snapshot(201, 201, &[], 201))).dropped.len(), 1000);
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn a_transaction_of_another_database_does_not_keep_gaps() {
        // Transaction 100 (another database) holds the cluster's xmin; 150 took id 1001 here.
        let mut c = cursor_at(snapshot(100, 151, &[100, 150], 151));
        c.take(&mut [2001], Some(snapshot(100, 152, &[100, 150], 152)));
        // While 150 runs here, nothing is dropped.
        c.gaps.settle(&[150]);
        assert_eq!(c.take(&mut [], Some(snapshot(100, 152, &[100, 150], 152))), Taken::default());
        // 150 rolls back: looked up once, then dropped although 100 still holds the xmin.
        assert_eq!(c.take(&mut [], Some(snapshot(100, 153, &[100], 153))).due, 1);
        c.gaps.looked_up(&[]);
        c.gaps.settle(&[]);
        assert_eq!(c.take(&mut [], Some(snapshot(100, 153, &[100], 153))).dropped, vec![1001]);
    }

    #[test]
    fn settling_reads_32_bit_ids_across_an_epoch() {
        let mut g = Gaps { last: Some(snapshot(1, 2, &[], (1 << 32) + 5)), ..Gaps::default() };
        g.settle(&[u32::MAX - 1, 3]);
        assert_eq!(g.settled, (1 << 32) - 2);
        g.settle(&[]);
        assert_eq!(g.settled, (1 << 32) + 5);
        g.settle(&[u32::MAX]);
        assert_eq!(g.settled, (1 << 32) + 5, "never moves back");
    }

    #[test]
    fn start_of_session_gaps_are_kept_and_resolved_the_same_way() {
        let mut c = Cursor::new(Some(5001), "db".into());
        c.remember(&[3001, 5001], snapshot(100, 101, &[100], 101));
        assert_eq!(c.take(&mut [4001], Some(snapshot(100, 101, &[100], 101))), Taken::default());
        assert_eq!(c.gaps.len(), 2);
        // 100 commits 5001 (above the cursor: the page reads it) and 3001 was rolled back.
        assert_eq!(c.take(&mut [5001], Some(snapshot(102, 102, &[], 102))).due, 1);
        assert_eq!(c.gaps.due(), vec![3001]);
        c.gaps.looked_up(&[]);
        assert_eq!(c.take(&mut [], Some(snapshot(102, 102, &[], 102))).dropped, vec![3001]);
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn a_start_of_session_gap_above_the_cursor_is_left_to_the_pages() {
        // The session began after transaction 100 took id 5001 (open: a start gap) and saved the
        // same table row as 2001 did, pending since before; the catch-up reads a page at a time.
        let mut c = Cursor::new(Some(5001), "db".into());
        // (98, in another database, stays open all along.)
        c.remember(&[5001], snapshot(98, 101, &[98, 99, 100], 101));
        // The first page stops at 1001; 99 has ended meanwhile, and 100 commits right after
        // this snapshot. Looked up now, 5001 would be dispatched before 2001, which the next
        // page reads.
        assert_eq!(c.take(&mut [1001], Some(snapshot(98, 101, &[98, 100], 101))), Taken::default());
        assert_eq!(c.gaps.due(), Vec::<i64>::new(), "not looked up ahead of the cursor");
        // The next pages read 2001 and then 5001, in order.
        assert_eq!(c.take(&mut [2001], Some(snapshot(98, 101, &[98], 101))), Taken::default());
        assert_eq!(c.gaps.due(), Vec::<i64>::new());
        assert_eq!(c.take(&mut [5001], Some(snapshot(98, 101, &[98], 101))), Taken::default());
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn a_start_of_session_gap_the_cursor_passes_is_looked_up_once_its_transaction_ends() {
        let mut c = Cursor::new(Some(5001), "db".into());
        c.remember(&[3001], snapshot(99, 101, &[99, 100], 101));
        // 99 ends while 3001 is ahead: not due. The page passes 3001, which 100 still holds.
        assert_eq!(c.take(&mut [1001, 2001, 4001], Some(snapshot(100, 102, &[100], 102))), Taken::default());
        assert_eq!(c.gaps.due(), Vec::<i64>::new());
        assert_eq!(c.gaps.len(), 1);
        // 100 ends: 3001 is behind the cursor now, and looked up.
        assert_eq!(c.take(&mut [], Some(snapshot(102, 102, &[], 102))).due, 1);
        assert_eq!(c.gaps.due(), vec![3001]);
        c.gaps.looked_up(&[3001]);
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn a_rolled_back_start_of_session_gap_ahead_of_the_cursor_is_dropped() {
        let mut c = Cursor::new(Some(5001), "db".into());
        c.remember(&[5001], snapshot(100, 101, &[100], 101));
        // 100 rolled back: nothing to look up; the pages would have read its row, had it one.
        assert_eq!(c.take(&mut [1001], Some(snapshot(101, 101, &[], 101))), Taken { due: 0, dropped: vec![5001] });
        assert!(c.gaps.is_empty());
    }

    #[test]
    fn past_the_limit_the_oldest_gaps_make_room() {
        let mut c = cursor_at(snapshot(100, 101, &[100], 101));
        c.take(&mut [(MAX_GAPS as i64 + 1) * CHUNK + 1], Some(snapshot(100, 101, &[100], 101)));
        assert_eq!((c.gaps.len(), c.gaps.evicted), (MAX_GAPS, 0));
        let next = (MAX_GAPS as i64 + 3) * CHUNK + 1;
        c.take(&mut [next], Some(snapshot(100, 102, &[100], 102)));
        assert_eq!((c.gaps.len(), c.gaps.evicted), (MAX_GAPS, 1));
        assert!(!c.gaps.horizon.contains_key(&(CHUNK + 1)), "the oldest went");
        assert!(c.gaps.horizon.contains_key(&(next - CHUNK)), "the newest stayed");
        // A jump past more ids than can be remembered keeps the nearest.
        let mut c = cursor_at(snapshot(100, 101, &[100], 101));
        c.take(&mut [3 * MAX_GAPS as i64 * CHUNK + 1], Some(snapshot(100, 101, &[100], 101)));
        assert_eq!(c.gaps.len(), MAX_GAPS);
        assert!(c.gaps.horizon.contains_key(&((3 * MAX_GAPS as i64 - 1) * CHUNK + 1)));
    }
}
