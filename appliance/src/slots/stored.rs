//! The slot table's stored form: rows of the control store's `slots` table from the table's
//! states, and back, checking every invariant.

use std::collections::BTreeSet;

use crate::db::{CONTROL_FILE, SlotEntry, StoredSlots};

use super::{ItemId, SlotError, SlotState, check_slot_count, fresh_slots, path_problem};

/// The stored rows of attached LUNs.
pub(super) fn entries(slots: &[SlotState]) -> Vec<SlotEntry> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(index, state)| match state {
            SlotState::Attached {
                item,
                disk_index,
                path,
            } => Some(SlotEntry {
                lun: index as u32,
                item: item.0,
                disk_index: *disk_index,
                path: path.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The slots of a stored table, or why it breaks an invariant (a row that does not decode,
/// a LUN outside the table, a disk or a path twice): a bug or tampering, refused rather than
/// guessed around, since guessing would risk double-booking a LUN.
pub(super) fn decode_stored(stored: StoredSlots) -> Result<Vec<SlotState>, SlotError> {
    let corrupt = |reason: String| SlotError::Corrupt {
        reason: format!("{CONTROL_FILE} table slots: {reason}"),
    };
    if stored.need_rebuild {
        return Err(corrupt(
            "marked for a rebuild from the item records (the migrated slot pages were damaged)"
                .to_owned(),
        ));
    }
    check_slot_count(stored.slot_count).map_err(|e| corrupt(e.to_string()))?;
    let mut slots = fresh_slots(stored.slot_count);
    let mut disks = BTreeSet::new();
    let mut paths = BTreeSet::new();
    for row in stored.rows {
        let entry = row.map_err(corrupt)?;
        let lun = entry.lun;
        let item = ItemId(entry.item);
        if lun == 0 || lun >= stored.slot_count {
            return Err(corrupt(format!(
                "LUN {lun} is outside 1..{}",
                stored.slot_count
            )));
        }
        if let Some(reason) = path_problem(&entry.path) {
            return Err(corrupt(format!(
                "LUN {lun}: path {:?}: {reason}",
                entry.path
            )));
        }
        if !disks.insert((item, entry.disk_index)) {
            return Err(corrupt(format!(
                "item {item} disk {} holds more than one LUN (again at LUN {lun})",
                entry.disk_index
            )));
        }
        if !paths.insert(entry.path.clone()) {
            return Err(corrupt(format!(
                "path {:?} is attached twice (again at LUN {lun})",
                entry.path
            )));
        }
        slots[lun as usize] = SlotState::Attached {
            item,
            disk_index: entry.disk_index,
            path: entry.path,
        };
    }
    Ok(slots)
}
