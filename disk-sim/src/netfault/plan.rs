//! What the proxy is asked to do: standing fault plans, one-shot faults, delays, and the
//! counts of what it did.

use super::*;

/// A delay per forwarded chunk: `fixed` plus a seeded uniform `0..=jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delay {
    /// Always waited.
    pub fixed: Duration,
    /// Up to this much more, chosen per chunk.
    pub jitter: Duration,
}

impl Delay {
    /// A fixed delay.
    pub fn fixed(fixed: Duration) -> Self {
        Self {
            fixed,
            jitter: Duration::ZERO,
        }
    }

    /// `fixed` plus up to `jitter`.
    pub fn jittered(fixed: Duration, jitter: Duration) -> Self {
        Self { fixed, jitter }
    }

    pub(super) fn pick(&self, rng: &mut Rng) -> Duration {
        let jitter = self.jitter.as_micros() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            rng.below(jitter + 1)
        };
        self.fixed + Duration::from_micros(extra)
    }
}

/// Standing faults, applied to every connection until replaced ([`Proxy::set`]). The
/// default is a clean proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// Seeds the per-connection random choices (with the connection's number).
    pub seed: u64,
    /// Delay of each agent → appliance chunk (a frame, or a read in plain forwarding).
    pub delay_up: Option<Delay>,
    /// Delay of each appliance → agent chunk (replies, acks, closes).
    pub delay_down: Option<Delay>,
    /// Drop each connection after this many agent → appliance bytes (taken when the
    /// connection starts).
    pub drop_after_bytes: Option<u64>,
    /// Chance per frame, in parts per million, of dropping the connection inside the frame.
    pub drop_ppm: u32,
    /// Chance per frame (ppm) of flipping one of its bytes.
    pub flip_ppm: u32,
    /// Chance per frame (ppm) of sending it twice.
    pub duplicate_ppm: u32,
    /// Chance per frame (ppm) of swapping it with the next frame.
    pub reorder_ppm: u32,
}

/// A one-shot fault ([`Proxy::arm`]): applies once, to the next traffic that passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Drop the connection carrying the next agent → appliance bytes after `bytes` more of
    /// them (inside a frame, or between two).
    DropAfterBytes(u64),
    /// Flip (xor with a random non-zero value) one byte of the next frame, at a seeded
    /// offset outside its magic and its payload-length field (so the appliance always
    /// reports a checksum mismatch).
    Flip,
    /// Send the next frame twice.
    Duplicate,
    /// Swap the next two frames.
    Reorder,
    /// Delay each of the next `chunks` agent → appliance chunks.
    DelayUp {
        /// The delay per chunk.
        delay: Delay,
        /// How many chunks.
        chunks: u32,
    },
    /// Delay each of the next `chunks` appliance → agent chunks (acks).
    DelayDown {
        /// The delay per chunk.
        delay: Delay,
        /// How many chunks.
        chunks: u32,
    },
}

/// The kinds of fault, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A connection dropped.
    Drop,
    /// A chunk delayed.
    Delay,
    /// A byte flipped.
    Flip,
    /// A frame sent twice.
    Duplicate,
    /// Two frames swapped.
    Reorder,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        Self::Drop,
        Self::Delay,
        Self::Flip,
        Self::Duplicate,
        Self::Reorder,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Delay => "delay",
            Self::Flip => "flip",
            Self::Duplicate => "duplicate",
            Self::Reorder => "reorder",
        }
    }
}

impl NetFault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Self::DropAfterBytes(_) => FaultKind::Drop,
            Self::Flip => FaultKind::Flip,
            Self::Duplicate => FaultKind::Duplicate,
            Self::Reorder => FaultKind::Reorder,
            Self::DelayUp { .. } | Self::DelayDown { .. } => FaultKind::Delay,
        }
    }
}

/// What the proxy did (a snapshot of its counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Accepted connections whose upstream connect failed (closed at once).
    pub upstream_failures: u64,
    /// Connections that fell back to plain forwarding (not a mode-1 stream, or odd bytes).
    pub unframed: u64,
    /// Bytes forwarded agent → appliance (duplicates included).
    pub bytes_up: u64,
    /// Bytes forwarded appliance → agent.
    pub bytes_down: u64,
    /// Whole frames seen agent → appliance.
    pub frames: u64,
    /// Connections dropped (one-shot, standing, or [`Proxy::drop_connections`]).
    pub drops: u64,
    /// Chunks delayed (either direction).
    pub delays: u64,
    /// Total delay, in milliseconds.
    pub delay_ms: u64,
    /// Bytes flipped.
    pub flips: u64,
    /// Frames sent twice.
    pub duplicates: u64,
    /// Pairs of frames swapped.
    pub reorders: u64,
    /// Frames held for a swap and released unswapped (no next frame in time).
    pub reorders_released: u64,
}

impl ProxyStats {
    /// How many faults of `kind` were injected.
    pub fn count(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::Drop => self.drops,
            FaultKind::Delay => self.delays,
            FaultKind::Flip => self.flips,
            FaultKind::Duplicate => self.duplicates,
            FaultKind::Reorder => self.reorders,
        }
    }
}
