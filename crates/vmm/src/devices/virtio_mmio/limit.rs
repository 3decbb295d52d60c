//! Rate limiting of the warnings a guest can trigger on one device: the first
//! [`FIRST`] are logged in full, after that only a count, when the number suppressed
//! reaches a power of two. A guest that breaks its queue in a loop thus adds a
//! logarithmic number of lines to the log, not one per attempt.

/// Warnings logged in full per device.
pub const FIRST: u64 = 8;

/// What to do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it.
    Log,
    /// Log that this many have been suppressed so far.
    Summary(u64),
    /// Count it only.
    Quiet,
}

/// Counts a device's guest-triggered warnings.
#[derive(Debug, Default, Clone, Copy)]
pub struct WarnLimit {
    seen: u64,
}

impl WarnLimit {
    /// Counts one occurrence and says whether to log it.
    pub fn admit(&mut self) -> Admit {
        self.seen = self.seen.saturating_add(1);
        if self.seen <= FIRST {
            return Admit::Log;
        }
        let suppressed = self.seen - FIRST;
        if suppressed.is_power_of_two() {
            Admit::Summary(suppressed)
        } else {
            Admit::Quiet
        }
    }

    /// Occurrences counted so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_are_logged_then_counts_at_powers_of_two() {
        let mut l = WarnLimit::default();
        let verdicts: Vec<Admit> = (0..100_000).map(|_| l.admit()).collect();
        assert!(verdicts[..FIRST as usize].iter().all(|v| *v == Admit::Log));
        let lines = verdicts.iter().filter(|v| **v != Admit::Quiet).count();
        // 8 in full, then summaries at 1, 2, 4, ..., 65536 suppressed.
        assert_eq!(lines, FIRST as usize + 17);
        assert_eq!(verdicts[FIRST as usize], Admit::Summary(1));
        assert_eq!(verdicts[FIRST as usize + 3], Admit::Summary(4));
        assert_eq!(verdicts[FIRST as usize + 4], Admit::Quiet);
        assert_eq!(l.seen(), 100_000);
    }
}
