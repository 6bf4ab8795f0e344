//! Unit tests of the lifecycle table: one per transition, per undo at start, per allowed list.

use super::*;
use crate::items::model::{CopyState, DiskRecord, Format, Materialized, Policy, Role};

const ALL_STATES: [ItemState; 13] = [
    S::InitialReplication,
    S::Reprotecting,
    S::Protected,
    S::TestFailover,
    S::Resyncing,
    S::FailingOver,
    S::FailedOver,
    S::Committed,
    S::Reprotected,
    S::FailingBack,
    S::FailedBack,
    S::Disabled,
    S::Quarantined,
];

const ALL_OPS: [Op; 10] = [
    Op::TestFailover,
    Op::TestFailoverCleanup,
    Op::TestFailoverPromote,
    Op::Failover,
    Op::ChangePoint,
    Op::Commit,
    Op::Reprotect,
    Op::Failback,
    Op::Resync,
    Op::Disable,
];

fn all_events() -> Vec<Event> {
    let mut events = Vec::new();
    for op in ALL_OPS {
        events.extend([Start(op), Done(op), Failed(op)]);
    }
    events.extend([Synchronized, Interrupted, Event::Damaged]);
    events
}

fn disk(origin: DiskOrigin) -> DiskRecord {
    DiskRecord {
        index: 0,
        size_bytes: 1 << 20,
        block_size_bytes: 4096,
        path: "/data/disk-0.raw".into(),
        origin,
    }
}

fn disks_at_a_point() -> Materialized {
    Materialized {
        point_id: 7,
        target_dir: "/data/out".into(),
        format: Format::Raw,
        files: vec!["/data/out/disk-0.raw".into()],
        created_dir: true,
        target_dir_id: None,
        written: Vec::new(),
        export_id: None,
        copy: None,
    }
}

/// A record in `state` with one created disk, no test or failover disks.
fn record(state: ItemState) -> ItemRecord {
    ItemRecord {
        version: 1,
        id: "00112233445566778899aabbccddeeff".into(),
        name: "vm".into(),
        state,
        role: Role::Forward,
        reverse_of: None,
        reversed_by: None,
        disks: vec![disk(DiskOrigin::Created)],
        policy: Policy {
            keep_points: 1,
            keep_minutes: 0,
            app_consistent_minutes: 60,
        },
        temporary_os_disk: None,
        test_failover: None,
        failover: None,
        pending: None,
        sync_from_seq: 1,
        last_job: None,
        last_error: None,
        created_ns: 0,
        updated_ns: 0,
    }
}

fn with_attached_disks(mut record: ItemRecord) -> ItemRecord {
    record.disks = vec![disk(DiskOrigin::Attached)];
    record
}

fn with_test_disks(mut record: ItemRecord) -> ItemRecord {
    record.test_failover = Some(disks_at_a_point());
    record
}

fn with_failover_disks(mut record: ItemRecord) -> ItemRecord {
    record.failover = Some(disks_at_a_point());
    record
}

/// A test failover in export mode: a drill served over NBD.
fn with_test_export(mut record: ItemRecord) -> ItemRecord {
    record.test_failover = Some(Materialized {
        export_id: Some("ab".repeat(16)),
        ..disks_at_a_point()
    });
    record
}

/// A failover in export mode whose copy into the target files is `copy`.
fn with_failover_export(mut record: ItemRecord, copy: CopyState) -> ItemRecord {
    record.failover = Some(Materialized {
        export_id: Some("cd".repeat(16)),
        copy: Some(copy),
        ..disks_at_a_point()
    });
    record
}

/// `event` takes `record` to `to`, through `transition`, which returns the state left and
/// changes nothing else.
fn assert_step(mut record: ItemRecord, event: Event, to: ItemState) {
    let before = record.clone();
    assert_eq!(
        next(&record, event),
        Some(to),
        "{:?} on {event:?}",
        before.state
    );
    let left = transition(&mut record, event).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, before.state);
    assert_eq!(record.state, to);
    let mut unchanged = record.clone();
    unchanged.state = before.state;
    assert_eq!(
        serde_json::to_value(&unchanged).ok(),
        serde_json::to_value(&before).ok(),
        "only the state changes"
    );
}

/// `event` is no step from `record`: `transition` refuses it and changes nothing.
fn assert_no_step(mut record: ItemRecord, event: Event) {
    let state = record.state;
    assert_eq!(next(&record, event), None, "{state:?} on {event:?}");
    let error = transition(&mut record, event).err();
    assert!(error.is_some(), "{state:?} on {event:?} was a step");
    assert_eq!(record.state, state);
    let message = error.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains(state.name()), "{message}");
}

// ───────────── one test per transition ─────────────

#[test]
fn initial_replication_disable() {
    assert_step(
        record(S::InitialReplication),
        Start(Op::Disable),
        S::Disabled,
    );
}

#[test]
fn initial_replication_synchronized() {
    assert_step(record(S::InitialReplication), Synchronized, S::Protected);
}

#[test]
fn reprotecting_disable() {
    assert_step(record(S::Reprotecting), Start(Op::Disable), S::Disabled);
}

#[test]
fn reprotecting_synchronized() {
    assert_step(record(S::Reprotecting), Synchronized, S::Protected);
}

#[test]
fn resyncing_disable() {
    assert_step(record(S::Resyncing), Start(Op::Disable), S::Disabled);
}

#[test]
fn resyncing_synchronized() {
    assert_step(record(S::Resyncing), Synchronized, S::Protected);
}

#[test]
fn resyncing_failed_resync_undo() {
    assert_step(record(S::Resyncing), Failed(Op::Resync), S::Protected);
}

#[test]
fn protected_test_failover() {
    assert_step(
        record(S::Protected),
        Start(Op::TestFailover),
        S::TestFailover,
    );
}

#[test]
fn protected_failover() {
    assert_step(record(S::Protected), Start(Op::Failover), S::FailingOver);
}

#[test]
fn protected_resync() {
    assert_step(record(S::Protected), Start(Op::Resync), S::Resyncing);
}

#[test]
fn protected_failback_with_attached_disks() {
    let attached = with_attached_disks(record(S::Protected));
    assert_step(attached, Start(Op::Failback), S::FailingBack);
}

#[test]
fn protected_failback_refused_with_created_disks() {
    assert_no_step(record(S::Protected), Start(Op::Failback));
}

#[test]
fn protected_disable() {
    assert_step(record(S::Protected), Start(Op::Disable), S::Disabled);
}

#[test]
fn test_failover_cleanup() {
    let written = with_test_disks(record(S::TestFailover));
    assert_step(written, Start(Op::TestFailoverCleanup), S::Protected);
}

#[test]
fn test_failover_cleanup_refused_while_its_job_runs() {
    assert_no_step(record(S::TestFailover), Start(Op::TestFailoverCleanup));
}

#[test]
fn test_failover_disable() {
    let written = with_test_disks(record(S::TestFailover));
    assert_step(written, Start(Op::Disable), S::Disabled);
}

#[test]
fn test_failover_disable_refused_while_its_job_runs() {
    assert_no_step(record(S::TestFailover), Start(Op::Disable));
}

#[test]
fn test_failover_failed_undo() {
    assert_step(
        record(S::TestFailover),
        Failed(Op::TestFailover),
        S::Protected,
    );
}

#[test]
fn failing_over_failover_done() {
    assert_step(record(S::FailingOver), Done(Op::Failover), S::FailedOver);
}

#[test]
fn failing_over_failover_failed_undo() {
    assert_step(record(S::FailingOver), Failed(Op::Failover), S::Protected);
}

#[test]
fn failing_over_change_point_done() {
    let changing = with_failover_disks(record(S::FailingOver));
    assert_step(changing, Done(Op::ChangePoint), S::FailedOver);
}

#[test]
fn failing_over_change_point_failed_undo() {
    let changing = with_failover_disks(record(S::FailingOver));
    assert_step(changing, Failed(Op::ChangePoint), S::FailedOver);
}

#[test]
fn failed_over_change_point() {
    let failed_over = with_failover_disks(record(S::FailedOver));
    assert_step(failed_over, Start(Op::ChangePoint), S::FailingOver);
}

#[test]
fn failed_over_commit() {
    assert_step(record(S::FailedOver), Start(Op::Commit), S::Committed);
}

#[test]
fn failed_over_disable() {
    assert_step(record(S::FailedOver), Start(Op::Disable), S::Disabled);
}

#[test]
fn committed_reprotect() {
    assert_step(record(S::Committed), Start(Op::Reprotect), S::Reprotected);
}

#[test]
fn committed_disable() {
    assert_step(record(S::Committed), Start(Op::Disable), S::Disabled);
}

#[test]
fn reprotected_disable() {
    assert_step(record(S::Reprotected), Start(Op::Disable), S::Disabled);
}

#[test]
fn failing_back_done() {
    assert_step(record(S::FailingBack), Done(Op::Failback), S::FailedBack);
}

#[test]
fn failing_back_failed_undo() {
    assert_step(record(S::FailingBack), Failed(Op::Failback), S::Protected);
}

#[test]
fn test_failover_promote_of_a_drill() {
    assert_step(
        with_test_export(record(S::TestFailover)),
        Start(Op::TestFailoverPromote),
        S::FailingOver,
    );
    // A test failover in copy mode has no drill to promote.
    assert_no_step(
        with_test_disks(record(S::TestFailover)),
        Start(Op::TestFailoverPromote),
    );
}

#[test]
fn failing_over_promote_failed_undo() {
    assert_step(
        with_test_export(record(S::FailingOver)),
        Failed(Op::TestFailoverPromote),
        S::TestFailover,
    );
}

#[test]
fn at_start_undoes_a_promote_to_the_test_failover() {
    let promoting = with_test_export(record(S::FailingOver));
    assert_eq!(
        at_start(&promoting),
        AtStart::Undo {
            to: S::TestFailover
        }
    );
    assert_step(promoting, Interrupted, S::TestFailover);
}

#[test]
fn commit_waits_for_an_export_failovers_copy() {
    for copy in [CopyState::Copying, CopyState::Failed] {
        assert_no_step(
            with_failover_export(record(S::FailedOver), copy),
            Start(Op::Commit),
        );
    }
    assert_step(
        with_failover_export(record(S::FailedOver), CopyState::Done),
        Start(Op::Commit),
        S::Committed,
    );
}

#[test]
fn failed_back_disable() {
    assert_step(record(S::FailedBack), Start(Op::Disable), S::Disabled);
}

#[test]
fn failed_back_failback_undo_is_no_step() {
    // The clean-up after the handing back failed: the item stays failed back.
    assert_no_step(record(S::FailedBack), Failed(Op::Failback));
}

#[test]
fn quarantined_disable() {
    assert_step(record(S::Quarantined), Start(Op::Disable), S::Disabled);
}

#[test]
fn damaged_quarantines_from_every_state() {
    for state in ALL_STATES {
        assert_step(record(state), Event::Damaged, S::Quarantined);
    }
}

#[test]
fn disabled_is_final() {
    for event in all_events() {
        if event != Event::Damaged {
            assert_no_step(record(S::Disabled), event);
        }
    }
}

#[test]
fn a_failed_resync_after_disable_is_no_step() {
    assert_no_step(record(S::Disabled), Failed(Op::Resync));
}

#[test]
fn every_row_is_tested_above_and_nothing_else_is_a_step() {
    // The rows, as listed in the tests above (a new row needs a test and an entry here).
    let tested = 36;
    assert_eq!(TRANSITIONS.len(), tested, "a row without its test");
    // Every (state, guard, event) not in the table is refused.
    let variants = |state| {
        [
            record(state),
            with_attached_disks(record(state)),
            with_test_disks(record(state)),
            with_failover_disks(record(state)),
            with_test_export(record(state)),
            with_failover_export(record(state), CopyState::Copying),
        ]
    };
    for state in ALL_STATES {
        for record in variants(state) {
            for event in all_events() {
                let row = TRANSITIONS
                    .iter()
                    .find(|t| t.from == state && t.event == event && t.guard.holds(&record));
                match row {
                    Some(row) => assert_eq!(next(&record, event), Some(row.to)),
                    None if event == Event::Damaged => {}
                    None => assert_no_step(record.clone(), event),
                }
            }
        }
    }
}

#[test]
fn rows_are_unambiguous() {
    for (i, a) in TRANSITIONS.iter().enumerate() {
        for b in &TRANSITIONS[i + 1..] {
            if a.from == b.from && a.event == b.event {
                let both = |record: &ItemRecord| a.guard.holds(record) && b.guard.holds(record);
                for record in [
                    record(a.from),
                    with_attached_disks(record(a.from)),
                    with_test_disks(record(a.from)),
                    with_failover_disks(record(a.from)),
                    with_test_export(record(a.from)),
                    with_failover_export(record(a.from), CopyState::Copying),
                ] {
                    assert!(!both(&record), "{a:?} and {b:?} both apply");
                }
            }
        }
    }
}

// ───────────── allowed operations, refusals ─────────────

fn names(record: &ItemRecord) -> Vec<&'static str> {
    allowed(record).into_iter().map(Op::name).collect()
}

#[test]
fn allowed_in_sync_states_is_disable_only() {
    for state in [S::InitialReplication, S::Reprotecting, S::Resyncing] {
        assert_eq!(names(&record(state)), ["disable"], "{state:?}");
    }
}

#[test]
fn allowed_when_protected_in_the_api_order() {
    assert_eq!(
        names(&record(S::Protected)),
        ["test-failover", "failover", "resync", "disable"]
    );
    assert_eq!(
        names(&with_attached_disks(record(S::Protected))),
        ["test-failover", "failover", "resync", "failback", "disable"]
    );
}

#[test]
fn allowed_in_test_failover() {
    assert!(names(&record(S::TestFailover)).is_empty());
    assert_eq!(
        names(&with_test_disks(record(S::TestFailover))),
        ["test-failover-cleanup", "disable"]
    );
    assert_eq!(
        names(&with_test_export(record(S::TestFailover))),
        ["test-failover-cleanup", "test-failover-promote", "disable"]
    );
}

#[test]
fn allowed_while_a_job_runs_or_disabled_is_nothing() {
    for state in [S::FailingOver, S::FailingBack, S::Disabled] {
        assert!(names(&record(state)).is_empty(), "{state:?}");
    }
}

#[test]
fn allowed_after_failover() {
    assert_eq!(
        names(&record(S::FailedOver)),
        ["change-point", "commit", "disable"]
    );
    assert_eq!(names(&record(S::Committed)), ["reprotect", "disable"]);
}

#[test]
fn allowed_in_end_states_is_disable_only() {
    for state in [S::Reprotected, S::FailedBack, S::Quarantined] {
        assert_eq!(names(&record(state)), ["disable"], "{state:?}");
    }
}

#[test]
fn check_allowed_refuses_with_the_state_and_what_is_allowed() {
    let hex = "00112233445566778899aabbccddeeff";
    assert!(check_allowed(hex, &record(S::Protected), Op::Failover).is_ok());
    let refused = check_allowed(hex, &record(S::FailedOver), Op::Failover).err();
    assert_eq!(
        refused.map(|e| e.to_string()).as_deref(),
        Some(
            "item 00112233445566778899aabbccddeeff is failed_over; failover is not allowed \
             (allowed: change-point, commit, disable)"
        )
    );
    let running = check_allowed(hex, &record(S::FailingOver), Op::Disable).err();
    assert_eq!(
        running.map(|e| e.to_string()).as_deref(),
        Some(
            "item 00112233445566778899aabbccddeeff is failing_over; disable is not allowed \
             (allowed: none while its job runs)"
        )
    );
}

// ───────────── one test per undo at start ─────────────

#[test]
fn at_start_undoes_a_test_failover_whose_job_did_not_end() {
    assert_eq!(
        at_start(&record(S::TestFailover)),
        AtStart::Undo { to: S::Protected }
    );
    assert_step(record(S::TestFailover), Interrupted, S::Protected);
}

#[test]
fn at_start_keeps_a_test_failover_whose_disks_are_written() {
    let written = with_test_disks(record(S::TestFailover));
    assert_eq!(at_start(&written), AtStart::Serve);
    assert_no_step(written, Interrupted);
}

#[test]
fn at_start_undoes_a_failover_to_protected() {
    assert_eq!(
        at_start(&record(S::FailingOver)),
        AtStart::Undo { to: S::Protected }
    );
    assert_step(record(S::FailingOver), Interrupted, S::Protected);
}

#[test]
fn at_start_undoes_a_change_point_to_failed_over() {
    let changing = with_failover_disks(record(S::FailingOver));
    assert_eq!(at_start(&changing), AtStart::Undo { to: S::FailedOver });
    assert_step(changing, Interrupted, S::FailedOver);
}

#[test]
fn at_start_undoes_a_failback_to_protected() {
    assert_eq!(
        at_start(&record(S::FailingBack)),
        AtStart::Undo { to: S::Protected }
    );
    assert_step(record(S::FailingBack), Interrupted, S::Protected);
}

#[test]
fn at_start_finishes_a_disable() {
    assert_eq!(
        at_start(&record(S::Disabled)),
        AtStart::CleanUp { purge: true }
    );
}

#[test]
fn at_start_finishes_a_failback_clean_up() {
    assert_eq!(
        at_start(&record(S::FailedBack)),
        AtStart::CleanUp { purge: false }
    );
}

#[test]
fn at_start_serves_the_other_states() {
    for state in [
        S::InitialReplication,
        S::Reprotecting,
        S::Protected,
        S::Resyncing,
        S::FailedOver,
        S::Committed,
        S::Reprotected,
    ] {
        assert_eq!(at_start(&record(state)), AtStart::Serve, "{state:?}");
    }
}

#[test]
fn job_at_start_a_sync_recorded_protected_succeeded() {
    for kind in [
        JobKind::InitialReplication,
        JobKind::Reprotect,
        JobKind::Resync,
    ] {
        assert_eq!(
            job_at_start(kind, Some(S::Protected), true),
            JobAtStart::Succeeded
        );
        // Not the item's newest job: an older sync that a restart interrupted.
        assert_eq!(
            job_at_start(kind, Some(S::Protected), false),
            JobAtStart::Interrupted
        );
    }
}

#[test]
fn job_at_start_a_sync_in_its_state_continues() {
    assert_eq!(
        job_at_start(
            JobKind::InitialReplication,
            Some(S::InitialReplication),
            true
        ),
        JobAtStart::Continues
    );
    assert_eq!(
        job_at_start(JobKind::Reprotect, Some(S::Reprotecting), false),
        JobAtStart::Continues
    );
    assert_eq!(
        job_at_start(JobKind::Resync, Some(S::Resyncing), true),
        JobAtStart::Continues
    );
    assert_eq!(
        job_at_start(JobKind::Resync, Some(S::InitialReplication), true),
        JobAtStart::Interrupted
    );
}

#[test]
fn job_at_start_other_jobs_were_interrupted() {
    for kind in [
        JobKind::TestFailover,
        JobKind::Failover,
        JobKind::ChangePoint,
        JobKind::Failback,
    ] {
        for state in ALL_STATES {
            assert_eq!(
                job_at_start(kind, Some(state), true),
                JobAtStart::Interrupted
            );
        }
    }
    assert_eq!(
        job_at_start(JobKind::InitialReplication, None, false),
        JobAtStart::Interrupted
    );
}

// ───────────── properties of states ─────────────

#[test]
fn initial_states() {
    assert_eq!(
        initial(false),
        (S::InitialReplication, JobKind::InitialReplication)
    );
    assert_eq!(initial(true), (S::Reprotecting, JobKind::Reprotect));
}

#[test]
fn replicating_states_take_frames() {
    let replicating: Vec<ItemState> = ALL_STATES.into_iter().filter(|s| replicating(*s)).collect();
    assert_eq!(
        replicating,
        [
            S::InitialReplication,
            S::Reprotecting,
            S::Protected,
            S::TestFailover,
            S::Resyncing
        ]
    );
}

#[test]
fn only_failed_back_and_disabled_hold_no_slots() {
    for state in ALL_STATES {
        let expected = !matches!(state, S::FailedBack | S::Disabled);
        assert_eq!(holds_slots(state), expected, "{state:?}");
    }
}

#[test]
fn sync_states_have_their_job() {
    for state in ALL_STATES {
        let expected = match state {
            S::InitialReplication => Some(JobKind::InitialReplication),
            S::Reprotecting => Some(JobKind::Reprotect),
            S::Resyncing => Some(JobKind::Resync),
            _ => None,
        };
        assert_eq!(sync_job_kind(state), expected, "{state:?}");
        // Every sync ends with Synchronized.
        assert_eq!(
            next(&record(state), Synchronized).is_some(),
            expected.is_some()
        );
    }
}
