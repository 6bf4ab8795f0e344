//! Turning an op in a slot into its next SQE (fixed or plain buffers and files, short-I/O
//! remainders, zero ranges) and queueing it, with a backlog when the SQ is full.

use super::*;

/// Builds an SQE with either a fixed-file index or a raw fd (the opcode builders take
/// different types for the two).
macro_rules! with_target {
    ($target:expr, |$fd:ident| $body:expr) => {
        match $target {
            Target::Fixed(i) => {
                let $fd = types::Fixed(i);
                $body
            }
            Target::Raw(r) => {
                let $fd = types::Fd(r);
                $body
            }
        }
    };
}

impl UringEngine {
    /// Builds the next SQE of a slot's op (the part not yet done).
    pub(super) fn build_sqe(&mut self, slot_index: u32) -> io::Result<squeue::Entry> {
        /// What to put in the SQE, read out of the slot first.
        pub(super) enum Plan {
            Rw {
                is_read: bool,
                ptr: *mut u8,
                len: u32,
                offset: u64,
                fixed_buf: Option<u16>,
            },
            ZeroRange {
                offset: u64,
                len: u64,
            },
            ZeroWrite {
                offset: u64,
                len: u32,
            },
            Flush,
        }
        let registered_addr = self.registered_pool_addr;
        let zero = self.zero_buf.as_ref().map(|z| (z.as_mut_ptr(), z.len()));
        let slot = self
            .slots
            .get_mut(slot_index as usize)
            .ok_or_else(|| io::Error::other("io_uring slot index out of range"))?;
        let done = slot.done_bytes;
        let is_read = matches!(slot.op, SlotOp::Read { .. });
        let (file, plan) = match &mut slot.op {
            SlotOp::Idle => return Err(io::Error::other("io_uring slot is idle")),
            SlotOp::Read {
                file,
                offset_bytes,
                buf,
            }
            | SlotOp::Write {
                file,
                offset_bytes,
                buf,
            } => {
                let len = buf.len_bytes() as u64;
                let remaining = u32::try_from(len.saturating_sub(done))
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                let fixed_buf = if buf.pool_ptr() as usize == registered_addr {
                    u16::try_from(buf.arena_index()).ok()
                } else {
                    None
                };
                // SAFETY: `done < len <= capacity` (done only grows up to len, and an op with
                // done == len is finished, not resubmitted), so this stays inside the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(done as usize) };
                let plan = Plan::Rw {
                    is_read,
                    ptr,
                    len: remaining,
                    offset: *offset_bytes + done,
                    fixed_buf,
                };
                (*file, plan)
            }
            SlotOp::ZeroRange {
                file,
                offset_bytes,
                len_bytes,
            } => (
                *file,
                Plan::ZeroRange {
                    offset: *offset_bytes,
                    len: *len_bytes,
                },
            ),
            SlotOp::ZeroWrite {
                file,
                offset_bytes,
                len_bytes,
            } => {
                let (_, zero_len) =
                    zero.ok_or_else(|| io::Error::other("zero buffer not mapped"))?;
                // The zero buffer's length is a multiple of 4096, so every piece stays aligned.
                let chunk = len_bytes.saturating_sub(done).min(zero_len as u64) as u32;
                (
                    *file,
                    Plan::ZeroWrite {
                        offset: *offset_bytes + done,
                        len: chunk,
                    },
                )
            }
            SlotOp::Flush { file } => (*file, Plan::Flush),
        };
        let target = self.target(file).ok_or_else(unknown_file)?;
        let entry = match plan {
            Plan::Rw {
                is_read: true,
                ptr,
                len,
                offset,
                fixed_buf: Some(index),
            } => with_target!(target, |fd| {
                opcode::ReadFixed::new(fd, ptr, len, index)
                    .offset(offset)
                    .build()
            }),
            Plan::Rw {
                is_read: true,
                ptr,
                len,
                offset,
                fixed_buf: None,
            } => with_target!(target, |fd| {
                opcode::Read::new(fd, ptr, len).offset(offset).build()
            }),
            Plan::Rw {
                is_read: false,
                ptr,
                len,
                offset,
                fixed_buf: Some(index),
            } => with_target!(target, |fd| {
                opcode::WriteFixed::new(fd, ptr.cast_const(), len, index)
                    .offset(offset)
                    .build()
            }),
            Plan::Rw {
                is_read: false,
                ptr,
                len,
                offset,
                fixed_buf: None,
            } => with_target!(target, |fd| {
                opcode::Write::new(fd, ptr.cast_const(), len)
                    .offset(offset)
                    .build()
            }),
            Plan::ZeroRange { offset, len } => with_target!(target, |fd| {
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE)
                    .build()
            }),
            Plan::ZeroWrite { offset, len } => {
                let (zero_ptr, _) =
                    zero.ok_or_else(|| io::Error::other("zero buffer not mapped"))?;
                with_target!(target, |fd| {
                    opcode::Write::new(fd, zero_ptr.cast_const(), len)
                        .offset(offset)
                        .build()
                })
            }
            Plan::Flush => with_target!(target, |fd| {
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }),
        };
        Ok(entry.user_data(u64::from(slot_index)))
    }

    /// Pushes the slot's next SQE into the SQ (or the backlog if the SQ is full). If the SQE
    /// cannot be built, the op finishes with that error.
    pub(super) fn queue_sqe(&mut self, slot_index: u32) {
        match self.build_sqe(slot_index) {
            Ok(entry) => {
                // SAFETY: every pointer in the entry refers to memory owned by the engine
                // until the matching CQE: the op's IoBuf sits in the slot, the zero buffer
                // and the registered pool live in `self`, and Drop waits for the kernel (or
                // leaks that memory).
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    self.backlog.push_back(slot_index);
                }
                self.sqes_outstanding += 1;
            }
            Err(e) => self.finish(slot_index, Err(e)),
        }
    }

    pub(super) fn push_backlog(&mut self) {
        while let Some(&slot_index) = self.backlog.front() {
            let entry = match self.build_sqe(slot_index) {
                Ok(entry) => entry,
                Err(e) => {
                    self.backlog.pop_front();
                    self.sqes_outstanding = self.sqes_outstanding.saturating_sub(1);
                    self.finish(slot_index, Err(e));
                    continue;
                }
            };
            // SAFETY: as in `queue_sqe`.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }
}
