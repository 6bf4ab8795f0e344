//! Property test: random sequences of the change map's operations (and crashes) against a
//! per-grain model of what the appliance may be missing.
//!
//! Invariant: every grain that was written and whose latest write is not durable at the
//! appliance (its frame not acknowledged, or it was marked unsent and not resent and
//! acknowledged since) is covered: in memory (unsent ∪ in-flight resends ∪ active extents)
//! and in what the state files hold (saved map ∪ the log's newest valid slot), i.e. after a
//! crash. The unsent set's memory never exceeds `max_map_bytes`.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{ITEM, MIB, NAME, drained, no_sync, small_limits, tempdir};
use crate::changemap::{ChangeMap, load};

const GRAIN: u64 = 4096;
const DISK: u64 = 128 * MIB; // 32 extents of 4 MiB, 16 active at most
const EXTENT: u64 = 4 * MIB;

/// A grain's state in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Durable at the appliance.
    Clean,
    /// Sent in frame `seq`, not known durable.
    Sent(u64),
    /// Not sent (or sent stale): must be resent.
    Unsent,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        length: u64,
        send: bool,
    },
    /// One small write into each of `count` consecutive extents (wrapping): forces
    /// evictions, of unacknowledged extents too.
    Burst {
        first_extent: u64,
        count: u64,
        send: bool,
    },
    MarkUnsent {
        offset: u64,
        length: u64,
    },
    Ack {
        fraction: u8,
    },
    Requeue,
    /// `racing`: a write into the handed-out range between `next_unsent` and `resent`: where
    /// (a fraction of the range), how long (in 512-byte units), sent or not.
    Resend {
        max_length: u64,
        racing: Option<(u16, u8, bool)>,
    },
    Checkpoint,
    Crash,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        4 => (0..DISK / GRAIN, 1..64u64).prop_map(|(g, n)| (g * GRAIN, (n * GRAIN).min(DISK - g * GRAIN))),
        1 => (0..DISK - 1, 1..9 * MIB).prop_map(|(o, l)| (o, l.min(DISK - o))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<bool>()).prop_map(|((offset, length), send)| Op::Write { offset, length, send }),
        2 => (0..DISK / EXTENT, 1..24u64, any::<bool>())
            .prop_map(|(first_extent, count, send)| Op::Burst { first_extent, count, send }),
        1 => range().prop_map(|(offset, length)| Op::MarkUnsent { offset, length }),
        3 => any::<u8>().prop_map(|fraction| Op::Ack { fraction }),
        1 => Just(Op::Requeue),
        4 => (1..2048u64, proptest::option::weighted(0.25, any::<(u16, u8, bool)>()))
            .prop_map(|(k, racing)| Op::Resend { max_length: k * GRAIN, racing }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
    ]
}

struct Model {
    grains: BTreeMap<u64, State>,
    next_seq: u64,
    acked: u64,
}

fn grains_of(offset: u64, length: u64) -> std::ops::Range<u64> {
    offset / GRAIN..(offset + length).div_ceil(GRAIN)
}

impl Model {
    fn write(&mut self, map: &mut ChangeMap, offset: u64, length: u64, send: bool) {
        map.begin_write(offset, length, &mut no_sync()).unwrap();
        let state = if send {
            let seq = self.next_seq;
            self.next_seq += 1;
            map.sent(offset, length, seq);
            State::Sent(seq)
        } else {
            map.mark_unsent(offset, length);
            State::Unsent
        };
        for grain in grains_of(offset, length) {
            self.grains.insert(grain, state);
        }
    }

    fn acked(&mut self, acked: u64) {
        self.acked = self.acked.max(acked);
        for state in self.grains.values_mut() {
            if matches!(*state, State::Sent(seq) if seq <= self.acked) {
                *state = State::Clean;
            }
        }
    }

    fn check(&self, map: &ChangeMap, dir: &std::path::Path, max_map_bytes: u64) {
        assert!(
            map.map_memory_bytes() <= max_map_bytes,
            "{}",
            map.map_memory_bytes()
        );
        let loaded = load(dir, NAME, ITEM, DISK).unwrap();
        let saved = loaded.map.unwrap();
        let log = loaded.log.unwrap();
        let on_disk = |offset: u64| {
            saved.runs.iter().any(|&(s, e)| (s..e).contains(&offset))
                || log.extents.contains(&(offset / log.extent_bytes))
        };
        for (&grain, &state) in &self.grains {
            if state != State::Clean {
                let offset = grain * GRAIN;
                assert!(
                    map.covers(offset),
                    "grain {grain} ({state:?}) not covered in memory"
                );
                assert!(
                    on_disk(offset),
                    "grain {grain} ({state:?}) not covered on disk"
                );
            }
        }
    }
}

fn run(ops: Vec<Op>, max_map_bytes: u64) {
    let dir = tempdir();
    let limits = small_limits(max_map_bytes);
    let mut map = drained(dir.path(), DISK, limits);
    let mut model = Model {
        grains: BTreeMap::new(),
        next_seq: 1_000,
        acked: 999,
    };
    map.acked(999);
    for op in ops {
        match op {
            Op::Write {
                offset,
                length,
                send,
            } => model.write(&mut map, offset, length, send),
            Op::Burst {
                first_extent,
                count,
                send,
            } => {
                for i in 0..count {
                    let offset = (first_extent + i) % (DISK / EXTENT) * EXTENT + (i % 7) * GRAIN;
                    model.write(&mut map, offset, GRAIN, send);
                }
            }
            Op::MarkUnsent { offset, length } => map.mark_unsent(offset, length),
            Op::Ack { fraction } => {
                let unacked = model.next_seq - 1 - model.acked;
                let acked = model.acked + unacked * u64::from(fraction) / 255;
                map.acked(acked);
                model.acked(acked);
            }
            Op::Requeue => {
                map.requeue_unacked(model.acked);
                let acked = model.acked;
                for state in model.grains.values_mut() {
                    if matches!(*state, State::Sent(seq) if seq > acked) {
                        *state = State::Unsent;
                    }
                }
                model.next_seq = acked + 1; // the restarted stream reuses the numbers
            }
            Op::Resend { max_length, racing } => {
                let Some((offset, length)) = map.next_unsent(max_length) else {
                    continue;
                };
                assert_eq!(offset % GRAIN, 0);
                assert!(length <= max_length.max(GRAIN) && offset + length <= DISK);
                let mut raced = Vec::new();
                if let Some((at, units, send)) = racing {
                    let o = offset + length * u64::from(at) / 65536;
                    let l = ((u64::from(units) + 1) * 512).min(DISK - o);
                    model.write(&mut map, o, l, send);
                    raced.extend(grains_of(o, l));
                }
                let seq = model.next_seq;
                model.next_seq += 1;
                map.resent(offset, length, seq);
                for grain in grains_of(offset, length) {
                    let Some(state) = model.grains.get_mut(&grain) else {
                        continue;
                    };
                    *state = match *state {
                        // A write raced the resend: the frame may carry stale data.
                        _ if raced.contains(&grain) => State::Unsent,
                        State::Clean => State::Clean,
                        State::Sent(s) => State::Sent(s.max(seq)),
                        State::Unsent => State::Sent(seq),
                    };
                }
            }
            Op::Checkpoint => map.checkpoint(&mut no_sync()).unwrap(),
            Op::Crash => {
                drop(map);
                let reopened = ChangeMap::open(dir.path(), NAME, ITEM, DISK, limits).unwrap();
                map = reopened.0;
                for state in model.grains.values_mut() {
                    if *state != State::Clean {
                        *state = State::Unsent;
                    }
                }
                model.next_seq = model.acked + 1;
                map.acked(model.acked);
            }
        }
        model.check(&map, dir.path(), max_map_bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_unacknowledged_write_stays_covered(
        ops in proptest::collection::vec(op(), 1..120),
        max_map_bytes in prop_oneof![Just(1024u64), Just(4096), Just(256 << 10)],
    ) {
        run(ops, max_map_bytes);
    }
}

#[test]
fn the_limits_used_here_are_valid() {
    small_limits(1024).validate().unwrap();
    assert_eq!(DISK % MIB, 0);
}
