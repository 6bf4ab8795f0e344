//! The agent -> appliance direction: frame-aware (hello, stream header, frames through
//! engine's frame reader), where flips, duplicates, swaps and drops inside frames happen.

use super::*;

/// Where the agent → appliance parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Hello,
    StreamHeader,
    Frames,
    /// Not (or no longer) understood: bytes forwarded as they come.
    Plain,
}

/// The connection was dropped (by a fault or a failure): stop.
pub(super) struct Gone;

/// The agent → appliance direction.
pub(super) struct Up<'a> {
    pub(super) shared: &'a Shared,
    pub(super) conn: &'a Conn,
    pub(super) rng: Rng,
    /// Bytes received and not yet forwarded (at most one unit being assembled).
    pub(super) pending: Vec<u8>,
    pub(super) phase: Phase,
    /// A frame held back for a swap, and until when it waits.
    pub(super) held: Option<(Vec<u8>, Instant)>,
    /// Agent → appliance bytes left before the standing drop.
    pub(super) standing_drop: Option<u64>,
}

pub(super) fn le_u16(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

impl Up<'_> {
    pub(super) fn run(&mut self) {
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        loop {
            if self.drain_units().is_err() {
                return;
            }
            if let Some((_, until)) = &self.held
                && Instant::now() >= *until
                && self.release_held().is_err()
            {
                return;
            }
            if self.conn.is_dead() || self.shared.stopping.load(Ordering::Acquire) {
                return self.conn.abort();
            }
            match (&self.conn.agent).read(&mut buf) {
                Ok(0) => {
                    // The agent closed its sending half (or the connection): forward what is
                    // left, then pass the end on.
                    let rest = std::mem::take(&mut self.pending);
                    if self.release_held().is_ok()
                        && (rest.is_empty() || self.forward(&rest).is_ok())
                    {
                        let _ = self.conn.upstream.shutdown(Shutdown::Write);
                    }
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.conn.abort(),
            }
        }
    }

    /// The length of the next complete unit at the front of `pending`, if it is complete;
    /// switches to plain forwarding on anything not understood.
    pub(super) fn next_unit(&mut self) -> Option<usize> {
        let p = &self.pending;
        let len = match self.phase {
            Phase::Plain => return (!p.is_empty()).then_some(p.len()),
            Phase::Hello => {
                if p.len() < HELLO_MAGIC.len() {
                    return None;
                }
                if p[..HELLO_MAGIC.len()] != HELLO_MAGIC {
                    return self.plain();
                }
                if p.len() < HELLO_FIXED_BYTES {
                    return None;
                }
                let token = le_u16(p, 24);
                if token == 0 || token > MAX_TOKEN_BYTES {
                    return self.plain();
                }
                HELLO_FIXED_BYTES + token
            }
            // The stream header and the frames are measured by engine's frame reader, the
            // same code that decodes them in the appliance.
            Phase::StreamHeader => match stream_header_wire_len(p) {
                Ok(Some(len)) => len,
                Ok(None) => return None,
                Err(_) => return self.plain(),
            },
            Phase::Frames => match frame_wire_len(p) {
                Ok(Some(len)) => len,
                Ok(None) => return None,
                Err(_) => return self.plain(),
            },
        };
        (p.len() >= len).then_some(len)
    }

    pub(super) fn plain(&mut self) -> Option<usize> {
        self.phase = Phase::Plain;
        bump(&self.shared.counters.unframed, 1);
        (!self.pending.is_empty()).then_some(self.pending.len())
    }

    /// Forwards every complete unit in `pending`.
    pub(super) fn drain_units(&mut self) -> Result<(), Gone> {
        while let Some(len) = self.next_unit() {
            let phase = self.phase;
            let unit: Vec<u8> = self.pending.drain(..len).collect();
            match phase {
                Phase::Hello => {
                    // Mode 1 (stream) is followed by a stream header; anything else is not
                    // parsed further.
                    self.phase = if unit[6] == 1 {
                        Phase::StreamHeader
                    } else {
                        bump(&self.shared.counters.unframed, 1);
                        Phase::Plain
                    };
                    self.forward(&unit)?;
                }
                Phase::StreamHeader => {
                    self.phase = Phase::Frames;
                    self.forward(&unit)?;
                }
                Phase::Frames => self.frame(unit)?,
                Phase::Plain => self.forward(&unit)?,
            }
        }
        Ok(())
    }

    /// One whole frame: the faults that apply to it, then on to the appliance.
    pub(super) fn frame(&mut self, frame: Vec<u8>) -> Result<(), Gone> {
        let counters = &self.shared.counters;
        bump(&counters.frames, 1);
        if let Some((held, _)) = self.held.take() {
            // The swap: this frame first, then the one held back.
            bump(&counters.reorders, 1);
            self.forward(&frame)?;
            return self.forward(&held);
        }
        let plan = self.shared.plan();
        let armed = {
            let mut armed = lock(&self.shared.armed);
            if armed.flips > 0 {
                armed.flips -= 1;
                Some(FaultKind::Flip)
            } else if armed.duplicates > 0 {
                armed.duplicates -= 1;
                Some(FaultKind::Duplicate)
            } else if armed.reorders > 0 {
                armed.reorders -= 1;
                Some(FaultKind::Reorder)
            } else {
                None
            }
        };
        let rng = &mut self.rng;
        let mut chance = |ppm: u32| ppm > 0 && rng.chance(u64::from(ppm), 1_000_000);
        let fault = armed.or_else(|| {
            if chance(plan.drop_ppm) {
                Some(FaultKind::Drop)
            } else if chance(plan.flip_ppm) {
                Some(FaultKind::Flip)
            } else if chance(plan.duplicate_ppm) {
                Some(FaultKind::Duplicate)
            } else if chance(plan.reorder_ppm) {
                Some(FaultKind::Reorder)
            } else {
                None
            }
        });
        match fault {
            None | Some(FaultKind::Delay) => self.forward(&frame),
            Some(FaultKind::Drop) => {
                let cut = self.rng.below(frame.len() as u64) as usize;
                self.forward(&frame[..cut])?;
                bump(&counters.drops, 1);
                self.conn.abort();
                Err(Gone)
            }
            Some(FaultKind::Flip) => {
                let mut copy = frame;
                // Any byte but the magic (0..4) and the payload length (32..36).
                let choices = copy.len() - 8;
                let mut at = 4 + self.rng.below(choices as u64) as usize;
                if at >= PAYLOAD_LEN_AT {
                    at += 4;
                }
                copy[at] ^= (1 + self.rng.below(255)) as u8;
                bump(&counters.flips, 1);
                self.forward(&copy)
            }
            Some(FaultKind::Duplicate) => {
                bump(&counters.duplicates, 1);
                self.forward(&frame)?;
                self.forward(&frame)
            }
            Some(FaultKind::Reorder) => {
                self.held = Some((frame, Instant::now() + HOLD_TIMEOUT));
                Ok(())
            }
        }
    }

    /// Sends a frame held for a swap that found no partner; the swap stays armed.
    pub(super) fn release_held(&mut self) -> Result<(), Gone> {
        let Some((held, _)) = self.held.take() else {
            return Ok(());
        };
        bump(&self.shared.counters.reorders_released, 1);
        lock(&self.shared.armed).reorders += 1;
        self.forward(&held)
    }

    /// One chunk to the appliance: delay, drop countdowns, write.
    pub(super) fn forward(&mut self, bytes: &[u8]) -> Result<(), Gone> {
        if self.conn.is_dead() {
            return Err(Gone);
        }
        let (delay, allowed) = {
            let mut armed = lock(&self.shared.armed);
            let delay = match armed.delay_up.as_mut() {
                Some((delay, chunks)) if *chunks > 0 => {
                    let delay = *delay;
                    *chunks -= 1;
                    if *chunks == 0 {
                        armed.delay_up = None;
                    }
                    Some(delay)
                }
                _ => self.shared.plan().delay_up,
            };
            let len = bytes.len() as u64;
            let one_shot = armed.drop_after;
            if let Some(left) = one_shot {
                armed.drop_after = (left >= len).then(|| left - len);
            }
            let standing = self.standing_drop;
            if let Some(left) = standing {
                self.standing_drop = Some(left.saturating_sub(len));
            }
            let allowed = [one_shot, standing]
                .into_iter()
                .flatten()
                .filter(|left| *left < len)
                .min();
            (delay, allowed)
        };
        if let Some(delay) = delay {
            sleep_counted(self.shared, delay.pick(&mut self.rng));
        }
        let send = allowed.map_or(bytes.len(), |a| a as usize);
        if (&self.conn.upstream).write_all(&bytes[..send]).is_err() {
            self.conn.abort();
            return Err(Gone);
        }
        bump(&self.shared.counters.bytes_up, send as u64);
        if allowed.is_some() {
            if !self.conn.dead.swap(true, Ordering::AcqRel) {
                bump(&self.shared.counters.drops, 1);
            }
            self.conn.abort();
            return Err(Gone);
        }
        Ok(())
    }
}
