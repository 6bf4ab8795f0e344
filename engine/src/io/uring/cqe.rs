//! Completions: each CQE resubmits the rest of a short or interrupted op or finishes its
//! slot; entering the kernel, draining the CQ, and waiting out the kernel on drop.

use super::*;

impl UringEngine {
    /// Handles one CQE: finishes the op or queues its next SQE.
    pub(super) fn on_cqe(&mut self, user_data: u64, res: i32) {
        let Ok(slot_index) = u32::try_from(user_data) else {
            return;
        };
        let draining = self.draining;
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        if matches!(slot.op, SlotOp::Idle) {
            return;
        }
        self.sqes_outstanding = self.sqes_outstanding.saturating_sub(1);
        if res < 0 {
            let errno = -res;
            let retryable = errno == libc::EINTR || errno == libc::EAGAIN;
            if retryable && slot.retries < MAX_RETRIES && !draining {
                slot.retries += 1;
                self.queue_sqe(slot_index);
                return;
            }
            if let (libc::EOPNOTSUPP, false, SlotOp::ZeroRange { .. }) = (errno, draining, &slot.op)
            {
                self.switch_to_zero_write(slot_index);
                return;
            }
            self.finish(slot_index, Err(io::Error::from_raw_os_error(errno)));
            return;
        }
        let n = res as u64;
        slot.retries = 0;
        let (total, is_read, reports_len) = match &slot.op {
            SlotOp::Idle => return,
            SlotOp::Read { buf, .. } => (buf.len_bytes() as u64, true, true),
            SlotOp::Write { buf, .. } => (buf.len_bytes() as u64, false, true),
            SlotOp::ZeroWrite { len_bytes, .. } => (*len_bytes, false, false),
            SlotOp::ZeroRange { .. } | SlotOp::Flush { .. } => (0, false, false),
        };
        if total == 0 {
            // ZeroRange or Flush: one SQE, done.
            self.finish(slot_index, Ok(0));
            return;
        }
        if n == 0 {
            if is_read {
                // End of file: report what was read and shorten the buffer to it.
                let done = slot.done_bytes;
                if let SlotOp::Read { buf, .. } = &mut slot.op {
                    buf.set_len_bytes(done as usize);
                }
                self.finish(slot_index, Ok(done as u32));
            } else {
                let e = io::Error::new(io::ErrorKind::WriteZero, "write transferred 0 bytes");
                self.finish(slot_index, Err(e));
            }
            return;
        }
        slot.done_bytes = (slot.done_bytes + n).min(total);
        if is_read && slot.done_bytes < total {
            // A short read that ends off the file's alignment can only be the end of a file
            // whose size is not a multiple of it; reading on would be a misaligned O_DIRECT
            // read (EINVAL). Report it as end of file.
            let file = match &slot.op {
                SlotOp::Read { file, .. } => *file,
                _ => 0,
            };
            let align = self
                .files
                .get(file as usize)
                .map_or(1, |f| u64::from(f.file.alignment_bytes()));
            let done = slot.done_bytes;
            if !done.is_multiple_of(align) {
                if let SlotOp::Read { buf, .. } = &mut slot.op {
                    buf.set_len_bytes(done as usize);
                }
                self.finish(slot_index, Ok(done as u32));
                return;
            }
        }
        if slot.done_bytes < total {
            if draining {
                let e = io::Error::new(
                    io::ErrorKind::Interrupted,
                    "engine dropped before the op finished",
                );
                self.finish(slot_index, Err(e));
            } else {
                self.queue_sqe(slot_index);
            }
            return;
        }
        let result = if reports_len { Ok(total as u32) } else { Ok(0) };
        self.finish(slot_index, result);
    }

    /// ZERO_RANGE was refused: remember it for the file and write zeros instead.
    pub(super) fn switch_to_zero_write(&mut self, slot_index: u32) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        let SlotOp::ZeroRange {
            file,
            offset_bytes,
            len_bytes,
        } = slot.op
        else {
            return;
        };
        slot.op = SlotOp::ZeroWrite {
            file,
            offset_bytes,
            len_bytes,
        };
        slot.done_bytes = 0;
        if let Some(f) = self.files.get_mut(file as usize) {
            f.zero_range_unsupported = true;
        }
        if self.zero_buf.is_none() {
            match map_zero_buf() {
                Ok(z) => self.zero_buf = Some(z),
                Err(e) => {
                    self.finish(slot_index, Err(e));
                    return;
                }
            }
        }
        self.queue_sqe(slot_index);
    }

    /// Handles every CQE available now.
    pub(super) fn drain_cq(&mut self) {
        loop {
            let mut scratch = std::mem::take(&mut self.cqe_scratch);
            scratch.clear();
            scratch.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            for &(user_data, res) in &scratch {
                self.on_cqe(user_data, res);
            }
            let got = scratch.len();
            self.cqe_scratch = scratch;
            if got == 0 {
                break;
            }
        }
    }

    /// `io_uring_enter` submitting the SQ and asking for events (needed under DEFER_TASKRUN
    /// even when not waiting). EINTR, EAGAIN, EBUSY and ETIME count as "try again".
    pub(super) fn enter(&mut self, min_complete: u32) -> io::Result<()> {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: no argument pointer is passed (`None`), and the flags are a valid set for
        // io_uring_enter; the SQEs being submitted satisfy the contract of `queue_sqe`.
        let res = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                to_submit,
                min_complete,
                EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drop helper: waits (with a timeout per call) for every SQE in the kernel. Returns false
    /// if it had to give up.
    pub(super) fn drain_for_drop(&mut self) -> bool {
        self.draining = true;
        // Backlogged SQEs never reached the kernel: finish them without I/O.
        while let Some(slot_index) = self.backlog.pop_front() {
            self.sqes_outstanding = self.sqes_outstanding.saturating_sub(1);
            self.finish(
                slot_index,
                Err(io::Error::from_raw_os_error(libc::ECANCELED)),
            );
        }
        // Completions nobody will reap: their buffers go back to the pool.
        self.ready.clear();
        if self.sqes_outstanding == 0 {
            return true;
        }
        if self.needs_enable {
            // The ring was never enabled, so nothing reached the kernel.
            return true;
        }
        if self.setup == RingSetup::SingleIssuerDeferTaskrun
            && self.owner.is_some_and(|o| o != std::thread::current().id())
        {
            // The kernel only runs this ring's completions on its owner thread.
            return false;
        }
        let mut last_progress = Instant::now();
        let timeout = types::Timespec::from(Duration::from_millis(100));
        while self.sqes_outstanding > 0 {
            let before = self.sqes_outstanding;
            let args = types::SubmitArgs::new().timespec(&timeout);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(_) => {
                    // No EXT_ARG support, or the ring is unusable: one blocking attempt.
                    if self.enter(1).is_err() {
                        return false;
                    }
                }
            }
            self.drain_cq();
            self.ready.clear();
            if self.sqes_outstanding < before {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > DROP_WAIT_MAX {
                return false;
            }
        }
        true
    }
}
