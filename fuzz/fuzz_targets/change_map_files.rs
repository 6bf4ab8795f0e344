//! Arbitrary bytes → a change map's two state files (`<name>.cmap`, `<name>.al`) →
//! `source_agent::changemap::ChangeMap::open`. It must never panic, and what it accepts must
//! be sane: the unsent set lies within the disk, and recovery marks at least what it says.
//!
//! Input: byte 0 holds flags, bytes 1..3 the map file's length (little-endian, clamped), then
//! the map file, then the activity log. Flags make valid-looking files reachable:
//! - bit 0: fix the map file's checksum (xxh3-64 of all bytes before its last 8);
//! - bit 1: fix each activity-log slot's checksum (slot = half the file; the checksum follows
//!   the count at bytes 56..64 and the 8-byte extent indices, from byte 64);
//! - bit 2: write the expected item id and disk size into both files' headers;
//! - bit 3: leave the activity log out (only the map file exists);
//! - bit 4: leave the map file out.

#![no_main]

use libfuzzer_sys::fuzz_target;
use source_agent::changemap::{ChangeMap, Limits};
use xxhash_rust::xxh3::xxh3_64;

const ITEM: [u8; 16] = [0x5a; 16];
const DISK_BYTES: u64 = 64 << 20;

fn fix_checksum(bytes: &mut [u8], body: usize) {
    if body + 8 <= bytes.len() {
        let sum = xxh3_64(&bytes[..body]).to_le_bytes();
        bytes[body..body + 8].copy_from_slice(&sum);
    }
}

fn identity(bytes: &mut [u8], item_at: usize, size_at: usize) {
    if size_at + 8 <= bytes.len() {
        bytes[item_at..item_at + 16].copy_from_slice(&ITEM);
        bytes[size_at..size_at + 8].copy_from_slice(&DISK_BYTES.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let rest = &data[3..];
    let map_len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(rest.len());
    let mut map = rest[..map_len].to_vec();
    let mut log = rest[map_len..].to_vec();
    if flags & 4 != 0 {
        identity(&mut map, 16, 32);
    }
    if flags & 1 != 0 && map.len() >= 8 {
        let body = map.len() - 8;
        fix_checksum(&mut map, body);
    }
    // An activity log is two slots of a multiple of 4096 bytes: pad short inputs so the
    // slot decoder is reached.
    if flags & 2 != 0 {
        let slot = log.len().div_ceil(2).div_ceil(4096).max(1) * 4096;
        log.resize(2 * slot, 0);
        for base in [0, slot] {
            let part = &mut log[base..base + slot];
            if flags & 4 != 0 {
                identity(part, 24, 40);
            }
            if part.len() >= 64 {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&part[56..64]);
                let count = u64::from_le_bytes(raw);
                if let Some(body) = count.checked_mul(8).and_then(|n| n.checked_add(64)) {
                    if let Ok(body) = usize::try_from(body) {
                        fix_checksum(part, body);
                    }
                }
            }
        }
    }
    let Ok(dir) = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()) else {
        return;
    };
    if flags & 16 == 0 {
        std::fs::write(dir.path().join("d.cmap"), &map).expect("write map file");
    }
    if flags & 8 == 0 {
        std::fs::write(dir.path().join("d.al"), &log).expect("write activity log");
    }
    let limits = Limits {
        max_map_bytes: 4096,
        al_extent_bytes: 4 << 20,
        al_extents: 16,
        ..Limits::default()
    };
    if let Ok((changemap, recovered)) = ChangeMap::open(dir.path(), "d", ITEM, DISK_BYTES, limits) {
        assert!(recovered.unsent_bytes <= DISK_BYTES);
        assert_eq!(changemap.unsent_bytes(), recovered.unsent_bytes);
        assert!(changemap.map_memory_bytes() <= limits.max_map_bytes);
        if recovered.fresh {
            assert_eq!(recovered.unsent_bytes, DISK_BYTES);
        }
        // What the map or the log recovered is unsent (bounded by the disk).
        assert!(
            recovered.unsent_bytes
                >= recovered.from_map_bytes.max(recovered.from_activity_log_bytes).min(DISK_BYTES)
        );
        // The state it saved opens again, recovering at least as much.
        drop(changemap);
        let (_, again) = ChangeMap::open(dir.path(), "d", ITEM, DISK_BYTES, limits)
            .expect("a map saved by open reopens");
        assert!(again.unsent_bytes >= recovered.unsent_bytes);
    }
});
