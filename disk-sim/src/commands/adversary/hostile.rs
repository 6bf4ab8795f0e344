//! The hostile kinds: what each one sends to the data port, and how its answer is judged.
//!
//! Each kind is one seeded action over one connection (the idle flood: many). Its
//! [`Outcome`] is a short answer label (aggregated in the summary) and, when the answer is
//! not the one the documents promise, a failure naming what happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::delta::DiskGeometry;
use engine::port::{ReceivedCloseReason, RefusalStatus};

use crate::rng::Rng;
use source_agent::sender::Agent;

mod connections;
mod frames;
mod hellos;
use connections::*;
use frames::*;
use hellos::*;

macro_rules! kinds {
    ($( $(#[$meta:meta])* $variant:ident => $name:literal, )*) => {
        /// One kind of hostile traffic (`disk-sim adversary --only NAME,…`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum HostileKind {
            $( $(#[$meta])* $variant, )*
        }

        impl HostileKind {
            /// Every kind, in summary order.
            pub const ALL: &'static [HostileKind] = &[$( HostileKind::$variant, )*];

            /// Its name on the command line and in the summary.
            pub fn name(self) -> &'static str {
                match self {
                    $( HostileKind::$variant => $name, )*
                }
            }
        }
    };
}

kinds! {
    /// A write frame, encoding zstd, whose payload is not zstd at all.
    ZstdGarbage => "zstd-garbage",
    /// A valid zstd frame cut short.
    ZstdTruncated => "zstd-truncated",
    /// A zstd payload without a content size that decompresses to less than the length.
    ZstdShort => "zstd-short",
    /// A zstd payload that decompresses to more than the length (some: RLE bombs of 8-64 MiB).
    ZstdLong => "zstd-long",
    /// A zstd frame header that declares a content size other than the frame's length.
    ZstdWrongSize => "zstd-wrong-size",
    /// Two zstd frames, each with its content size, whose total is not the length.
    ZstdConcatWrongTotal => "zstd-concat-wrong-total",
    /// Control: two zstd frames whose total is the length; must be acknowledged and applied
    /// (hostile items only).
    ZstdConcatValid => "zstd-concat-valid",
    /// A raw write whose payload is not `length` bytes.
    RawWrongLength => "raw-wrong-length",
    /// A frame whose seq skips ahead of the stream's first seq.
    SeqGap => "seq-gap",
    /// A frame whose seq is below the stream's first seq.
    SeqReorder => "seq-reorder",
    /// The same seq twice.
    SeqDuplicate => "seq-duplicate",
    /// A stream header whose first seq is past the reply's next seq.
    FirstSeqAhead => "first-seq-ahead",
    /// A resync-block frame in a session opened without RESYNC (hostile items only): valid in
    /// any session (data-port.md), so it must be acknowledged and applied like a write.
    ResyncOutside => "resync-outside-resync",
    /// A stream header and an end frame, the socket left open: the close must come anyway.
    EndFrame => "end-frame",
    /// Not a data-port client at all (HTTP, TLS, other magic).
    HelloBadMagic => "hello-bad-magic",
    /// Protocol version 0, 2 or 65535.
    HelloBadVersion => "hello-bad-version",
    /// Mode 0, 3 or 255.
    HelloBadMode => "hello-bad-mode",
    /// Undefined flag bits, or RESYNC in mode 2.
    HelloBadFlags => "hello-bad-flags",
    /// Token length 0, 257 or 65535 (no token sent).
    HelloBadTokenLen => "hello-bad-token-len",
    /// Mode 1 with a disk index or chunk size.
    HelloMode1Args => "hello-mode1-args",
    /// An item id that does not exist (modes 1 and 2).
    HelloUnknownItem => "hello-unknown-item",
    /// A wrong token (modes 1 and 2), replicating items included.
    HelloBadToken => "hello-bad-token",
    /// A hello cut short, then the sending half closed.
    HelloCutShort => "hello-cut-short",
    /// Mode 2, valid token, a disk the item does not have.
    HashUnknownDisk => "hash-unknown-disk",
    /// Mode 2, chunk sizes that are not a multiple of 4096 within 4 MiB.
    HashBadChunk => "hash-bad-chunk",
    /// Mode 2, valid: the hash list must come, with the documented size.
    HashOk => "hash-ok",
    /// Mode 1, valid, a stream header, then the sending half closed.
    StreamEmpty => "stream-empty",
    /// A connection that sends nothing for 1 s up to --idle-max-s.
    Idle => "idle",
    /// A valid hello trickled one byte at a time (up to 12 s in all).
    SlowTrickle => "slow-trickle",
    /// --flood idle connections held while a real agent must reconnect and be served.
    IdleFlood => "idle-flood",
}

impl HostileKind {
    /// Parses a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// An item hostile traffic is aimed at.
#[derive(Debug)]
pub struct Target {
    /// Item id.
    pub id: [u8; 16],
    /// Item name.
    pub name: String,
    /// Its stream token.
    pub token: Vec<u8>,
    /// Its disks.
    pub disks: Vec<DiskGeometry>,
    /// The real agent replicating it, or `None` for an item only hostile traffic uses.
    pub agent: Option<Arc<Agent>>,
}

/// What the hostile workers share.
#[derive(Debug)]
pub struct Context {
    /// The data port.
    pub data_addr: SocketAddr,
    /// Replicating and hostile items.
    pub targets: Vec<Target>,
    /// How long an answer may take.
    pub answer_timeout: Duration,
    /// Longest idle connection.
    pub idle_max: Duration,
    /// Connections of an idle flood.
    pub flood_connections: usize,
    /// How long an agent may take to be served during a flood.
    pub flood_serve_deadline: Duration,
    /// An idle flood is running.
    pub flooding: AtomicBool,
    /// Per target: the highest seq of a valid control frame acknowledged.
    pub controls: Mutex<BTreeMap<usize, u64>>,
}

/// How one action was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Short label, aggregated in the summary.
    pub answer: String,
    /// Why this answer breaks the documented contract, if it does.
    pub failure: Option<String>,
}

impl Outcome {
    fn ok(answer: impl Into<String>) -> Self {
        Self {
            answer: answer.into(),
            failure: None,
        }
    }

    fn bad(answer: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            answer: answer.into(),
            failure: Some(why.into()),
        }
    }
}

fn status_name(status: u8) -> String {
    if status == 0 {
        "ok".into()
    } else {
        RefusalStatus::from_u8(status).to_string()
    }
}

fn reason_name(reason: u8) -> String {
    ReceivedCloseReason::from_u8(reason).to_string()
}

/// Refusals that say "try later", acceptable for any hello.
fn transient(status: u8) -> bool {
    RefusalStatus::from_u8(status).is_transient()
}

/// Runs one action of `kind`.
pub fn act(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
    use HostileKind::*;
    match kind {
        ZstdGarbage | ZstdTruncated | ZstdShort | ZstdLong | ZstdWrongSize
        | ZstdConcatWrongTotal | ZstdConcatValid | RawWrongLength | SeqGap | SeqReorder
        | SeqDuplicate | FirstSeqAhead | ResyncOutside | EndFrame => frame_attack(kind, ctx, rng),
        HelloBadMagic | HelloBadVersion | HelloBadMode | HelloBadFlags | HelloBadTokenLen
        | HelloMode1Args | HelloUnknownItem | HelloBadToken | HelloCutShort | HashUnknownDisk
        | HashBadChunk => hello_attack(kind, ctx, rng),
        HashOk => hash_ok(ctx, rng),
        StreamEmpty => stream_empty(ctx, rng),
        Idle => idle(ctx, rng),
        SlowTrickle => slow_trickle(ctx, rng),
        IdleFlood => idle_flood(ctx, rng),
    }
}

fn pick(ctx: &Context, rng: &mut Rng, hostile_only: bool) -> Option<usize> {
    let candidates: Vec<usize> = (0..ctx.targets.len())
        .filter(|&i| !hostile_only || ctx.targets[i].agent.is_none())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[rng.below(candidates.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_frames_of_the_wrong_total_never_add_up() {
        // A seed-7 run acknowledged 3 of 91 such payloads: the first frame was the whole
        // length and the second empty, which is a valid payload, not a hostile one.
        let mut rng = Rng::new(7);
        for length_bytes in [4096, 8192, 65536, 1 << 20] {
            for _ in 0..10_000 {
                let (first, second) = concat_wrong_sizes(length_bytes, &mut rng);
                assert!(first > 0 && first <= length_bytes);
                assert_ne!(first + second, length_bytes, "{first} + {second}");
            }
        }
    }
}
