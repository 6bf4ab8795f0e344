//! source-agent: the source side of replication, a product component.
//!
//! It sits in front of a VM's disks (image files or block devices), serves each over NBD
//! (the workspace's one NBD server, `nbd-server`), writes every write through to the disk,
//! and streams it to the appliance's data port. The appliance never makes the VM wait: what
//! the link cannot take is remembered in a bounded, crash-safe change map and resent from the
//! disk later.
//!
//! Rooms:
//! - [`changemap`]: the persistent, bounded, crash-safe change map of one disk (the unsent
//!   set and the activity log), recovered after a crash.
//! - [`sender`]: the data-port sender: bounded backlog, handshake, resend from the last
//!   acknowledgement, fault hooks (used by disk-sim's simulated VMs too).
//! - [`capture`]: the disks served over NBD with write-through; every change streamed, or
//!   kept in the change map and resent from the disk; flush and requested bookmarks; quiesce.
//! - [`resync`]: delta resync over the data port (hash lists, diff, resync-block frames).
//! - [`config`], [`control`], [`freeze`], [`daemon`]: the `source-agent` binary's shell: its
//!   config file, control socket, fsfreeze around bookmarks, and the daemon that ties them
//!   to capture and the NBD server.

pub mod capture;
pub mod changemap;
pub mod config;
pub mod control;
pub mod daemon;
pub mod freeze;
pub mod resync;
pub mod sender;
