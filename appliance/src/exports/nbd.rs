//! The adapter from an engine export disk to an NBD export: requests pass through, errors
//! become the `io::ErrorKind` the NBD server maps to an NBD error number.

use std::io;

use engine::error::report;
use engine::export::{ExportDisk, ExportError};
use nbd_server::{BlockSizes, Export, Extent};

/// Largest request an NBD client may send (the server's limit too).
pub(crate) const MAX_REQUEST_BYTES: u32 = 32 << 20;

/// One disk of an export, as the NBD server sees it.
#[derive(Debug)]
pub(crate) struct NbdDisk {
    disk: ExportDisk,
    /// The replica's logical block size (the preferred I/O size advertised).
    block_size_bytes: u32,
}

impl NbdDisk {
    pub(crate) fn new(disk: ExportDisk, block_size_bytes: u32) -> Self {
        Self {
            disk,
            block_size_bytes,
        }
    }

    /// The engine's disk (a failover's copy, a change point's rebase).
    pub(crate) fn disk(&self) -> &ExportDisk {
        &self.disk
    }

    pub(crate) fn size_bytes_now(&self) -> u64 {
        self.disk.size_bytes()
    }

    pub(crate) fn written_bytes(&self) -> u64 {
        self.disk.written_bytes()
    }

    /// Ends service: clients get `ESHUTDOWN`.
    pub(crate) fn close(&self) {
        self.disk.close();
    }
}

fn io_error(error: ExportError) -> io::Error {
    io::Error::new(error.io_kind(), report(&error))
}

impl Export for NbdDisk {
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }

    fn read_only(&self) -> bool {
        !self.disk.writable()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum_bytes: 1,
            preferred_bytes: self.block_size_bytes.max(4096),
            maximum_bytes: MAX_REQUEST_BYTES,
        }
    }

    fn multi_conn(&self) -> bool {
        // A flush makes every write durable, whichever connection made it.
        true
    }

    fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        self.disk.read_at(offset_bytes, out).map_err(io_error)
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.disk
            .write_at(offset_bytes, data, fua)
            .map_err(io_error)
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.flush().map_err(io_error)
    }

    fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.disk
            .trim(offset_bytes, length_bytes, fua)
            .map_err(io_error)
    }

    fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.disk
            .write_zeroes(offset_bytes, length_bytes, fua)
            .map_err(io_error)
    }

    fn block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let mut extents = Vec::new();
        self.disk
            .extents(offset_bytes, length_bytes, &mut extents)
            .map_err(io_error)?;
        out.extend(extents.into_iter().map(|e| Extent {
            length_bytes: e.length_bytes,
            hole: e.hole,
            zero: e.zero,
        }));
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.disk.is_closed()
    }
}
