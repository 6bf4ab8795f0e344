//! The NBD export of a disk under capture: reads from the disk; writes, trims and zeroes
//! through [`Core::write`] (onto the disk, then into the stream or the change map); a flush
//! syncs the disk and asks for a crash-consistent bookmark.

use std::io;
use std::sync::Arc;

use nbd_server::{BlockSizes, Export, Extent};

use super::core::{Change, Core};
use super::disk::DiskFile;

/// A disk served with capture: every write goes to the disk and into the stream (or the
/// change map), in one order.
pub(super) struct CapturedDisk {
    pub(super) index: u16,
    pub(super) disk: Arc<DiskFile>,
    pub(super) core: Arc<Core>,
}

impl Export for CapturedDisk {
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn block_sizes(&self) -> BlockSizes {
        Export::block_sizes(&*self.disk)
    }

    fn description(&self) -> Option<String> {
        Some(format!("captured disk {}", self.disk.path().display()))
    }

    /// Safe: a flush on any connection syncs the one file, and its bookmark is taken under
    /// the order lock, after every write any connection completed.
    fn multi_conn(&self) -> bool {
        true
    }

    fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        Export::read_at(&*self.disk, offset_bytes, out)
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.disk.check(offset_bytes, data.len() as u64)?;
        self.core
            .write(self.index, offset_bytes, Change::Data(data))?;
        if fua { self.disk.sync() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.sync()?;
        self.core.flushed();
        Ok(())
    }

    fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset_bytes, length_bytes, fua)
    }

    fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.disk.check(offset_bytes, length_bytes)?;
        if length_bytes == 0 {
            return Ok(());
        }
        self.core
            .write(self.index, offset_bytes, Change::Zero(length_bytes))?;
        if fua { self.disk.sync() } else { Ok(()) }
    }

    fn block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        Export::block_status(&*self.disk, offset_bytes, length_bytes, out)
    }

    fn is_closed(&self) -> bool {
        self.core.is_stopping()
    }
}
