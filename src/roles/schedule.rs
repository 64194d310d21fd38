//! What the orchestrator tells the miners, and the tags messages travel
//! under.
//!
//! A window's schedule is fixed before it starts: every microbatch id with
//! its path (one miner per stage). Each miner then knows which microbatches
//! it serves and whom it receives from and sends to, so no rank needs a
//! receive-from-anyone.

use thiserror::Error;

/// Tag kinds, in the top byte; the low bytes carry a window or microbatch.
const KIND_SCHEDULE: u64 = 0x53;
const KIND_ACTIVATION: u64 = 0x41;
const KIND_GRADIENT: u64 = 0x47;
const KIND_LOSS: u64 = 0x4c;
const KIND_REDUCE: u64 = 0x52;
const KIND_DIGEST: u64 = 0x44;

fn tag(kind: u64, n: u64) -> u64 {
    (kind << 56) | (n & ((1 << 56) - 1))
}

pub fn schedule_tag(window: u64) -> u64 {
    tag(KIND_SCHEDULE, window)
}
pub fn activation_tag(mb: u64) -> u64 {
    tag(KIND_ACTIVATION, mb)
}
pub fn gradient_tag(mb: u64) -> u64 {
    tag(KIND_GRADIENT, mb)
}
pub fn loss_tag(mb: u64) -> u64 {
    tag(KIND_LOSS, mb)
}
/// Collectives of one window; spaced so each call has its own tags.
pub fn reduce_tag(window: u64) -> u64 {
    tag(KIND_REDUCE, window * 4)
}
pub fn digest_tag(window: u64) -> u64 {
    tag(KIND_DIGEST, window * 4)
}

/// Marks a validation microbatch id: forward only, tokens from the
/// validation split. Below the 56 bits tags carry, so it survives them.
pub const VALIDATION: u64 = 1 << 55;

pub fn is_validation(id: u64) -> bool {
    id & VALIDATION != 0
}

/// One window's plan: microbatch ids and their paths; empty means stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub window: u64,
    /// (microbatch id, miner rank per stage).
    pub paths: Vec<(u64, Vec<usize>)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed schedule: {0}")]
pub struct ScheduleError(String);

impl Schedule {
    pub fn is_stop(&self) -> bool {
        self.paths.is_empty()
    }

    /// Little-endian u64s: window, stages, count, then id and path per entry.
    pub fn encode(&self, stages: usize) -> Vec<u8> {
        let mut words = vec![self.window, stages as u64, self.paths.len() as u64];
        for (id, path) in &self.paths {
            words.push(*id);
            words.extend(path.iter().map(|r| *r as u64));
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Decodes and checks against the job's stage and world size.
    pub fn decode(bytes: &[u8], stages: usize, world: usize) -> Result<Schedule, ScheduleError> {
        let fail = |why: &str| ScheduleError(why.to_string());
        if bytes.len() % 8 != 0 || bytes.len() < 24 {
            return Err(fail("length is not 3 or more whole words"));
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let (window, s, count) = (words[0], words[1], words[2]);
        if s != stages as u64 {
            return Err(fail("stage count differs from the job's"));
        }
        let entry = 1 + stages;
        if (words.len() - 3) as u64 != count.saturating_mul(entry as u64) {
            return Err(fail("entry count does not match the length"));
        }
        let paths = words[3..]
            .chunks_exact(entry)
            .map(|e| {
                let path: Vec<usize> = e[1..].iter().map(|r| *r as usize).collect();
                if path.iter().any(|r| *r >= world) {
                    return Err(fail("path names a rank outside the world"));
                }
                Ok((e[0], path))
            })
            .collect::<Result<_, _>>()?;
        Ok(Schedule { window, paths })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_round_trip_and_garbage_is_refused() {
        let s = Schedule {
            window: 3,
            paths: vec![(24, vec![1, 3]), (25, vec![2, 4])],
        };
        assert_eq!(Schedule::decode(&s.encode(2), 2, 5).unwrap(), s);
        assert!(Schedule::decode(&s.encode(2), 3, 5).is_err());
        assert!(
            Schedule::decode(&s.encode(2), 2, 4).is_err(),
            "rank 4 outside"
        );
        assert!(Schedule::decode(&s.encode(2)[..30], 2, 5).is_err());
        assert!(Schedule::decode(&[], 2, 5).is_err());
    }

    #[test]
    fn tags_of_different_kinds_never_collide() {
        assert_ne!(activation_tag(7), gradient_tag(7));
        assert_ne!(loss_tag(7), schedule_tag(7));
        assert_ne!(reduce_tag(1), digest_tag(1));
    }
}
