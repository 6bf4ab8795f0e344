//! Workloads and the pacer, through the public API: reproducible from the seed, every op
//! aligned and inside its disk, Zipf hot spots, the database log, time-based bookmarks, and a
//! pacer that holds its rate on a simulated clock (nothing here sleeps).

use std::time::Duration;

use disk_sim::workload::{
    BurstSpec, Clock, DATABASE_LOG_WRITE_MAX_BYTES, DATABASE_PAGE_BYTES, DatabaseSpec,
    MAX_WRITE_BYTES, ManualClock, Op, Pacer, Pattern, Workload, WorkloadSpec, ZipfSpec,
};
use engine::delta::{Consistency, DiskGeometry};
use proptest::prelude::*;

fn disk(size_bytes: u64, block_size_bytes: u32) -> DiskGeometry {
    DiskGeometry {
        size_bytes,
        block_size_bytes,
    }
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop::sample::select(Pattern::ALL.to_vec())
}

/// A disk of 512 or 4096-byte blocks, from one block to 8 MiB (512) or 64 MiB (4096).
fn geometry() -> impl Strategy<Value = DiskGeometry> {
    (prop::bool::ANY, 1u64..=16_384).prop_map(|(big, blocks)| {
        let block = if big { 4096 } else { 512 };
        disk(blocks * u64::from(block), block)
    })
}

fn spec() -> impl Strategy<Value = WorkloadSpec> {
    (
        pattern(),
        9u32..=20,
        0u32..=1000,
        (0u64..20, 0u64..60, 0u64..300, 0u64..900),
        prop::option::of(1u64..(64 << 20)),
        (1u64..(4 << 20), 0.2f64..3.0),
        (0u64..300, 0u64..900),
        (prop::option::of(0u16..4), 0u64..(64 << 20), 0u32..=100),
    )
        .prop_map(
            |(pattern, max_log2, trims, bookmarks, churn, zipf, burst, database)| WorkloadSpec {
                pattern,
                write_max_bytes: 1 << max_log2,
                zero_range_per_mille: trims,
                compressible_percent: 50,
                crash_bookmark_every_ops: bookmarks.0,
                app_bookmark_every_ops: bookmarks.1,
                crash_bookmark_every_ms: bookmarks.2,
                app_bookmark_every_ms: bookmarks.3,
                churn_bytes_per_s: churn.unwrap_or(0),
                zipf: ZipfSpec {
                    region_bytes: zipf.0,
                    exponent: zipf.1,
                },
                burst: BurstSpec {
                    burst_ms: burst.0,
                    idle_ms: burst.1,
                },
                database: DatabaseSpec {
                    log_disk: database.0,
                    log_area_bytes: database.1,
                    log_write_percent: database.2,
                },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn same_seed_gives_the_same_ops_data_and_times(
        seed in any::<u64>(),
        spec in spec(),
        disks in prop::collection::vec(geometry(), 1..4),
    ) {
        let mut a = Workload::new(seed, spec.clone(), disks.clone());
        let mut b = Workload::new(seed, spec, disks);
        let (mut data_a, mut data_b) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            let op = a.next_op(&mut data_a);
            prop_assert_eq!(&op, &b.next_op(&mut data_b));
            prop_assert_eq!(a.op_at(), b.op_at());
            if matches!(op, Op::Write { .. }) {
                prop_assert_eq!(&data_a, &data_b);
            }
        }
    }

    #[test]
    fn every_op_is_aligned_and_inside_its_disk(
        seed in any::<u64>(),
        spec in spec(),
        disks in prop::collection::vec(geometry(), 1..4),
    ) {
        let mut workload = Workload::new(seed, spec, disks.clone());
        let mut data = Vec::new();
        let mut last_at = Duration::ZERO;
        let mut next_bookmark_id = 1;
        for _ in 0..400 {
            let op = workload.next_op(&mut data);
            prop_assert!(workload.op_at() >= last_at, "time went back");
            last_at = workload.op_at();
            match op {
                Op::Bookmark { bookmark_id, .. } => {
                    prop_assert_eq!(bookmark_id, next_bookmark_id);
                    next_bookmark_id += 1;
                }
                Op::Write { length_bytes, .. } => {
                    prop_assert_eq!(data.len(), length_bytes as usize);
                    prop_assert!(length_bytes <= MAX_WRITE_BYTES);
                }
                Op::ZeroRange { .. } => {}
            }
            if let Some((disk_index, offset_bytes, length_bytes)) = op.extent() {
                let geometry = disks[usize::from(disk_index)];
                prop_assert_eq!(geometry.check_extent(offset_bytes, length_bytes), Ok(()));
                prop_assert!(length_bytes >= u64::from(geometry.block_size_bytes.max(512)));
            }
        }
    }
}

/// Writes per 1 MiB region of a 256 MiB disk, over 20 000 writes.
fn region_counts(pattern: Pattern, exponent: f64) -> Vec<u64> {
    let spec = WorkloadSpec {
        pattern,
        zero_range_per_mille: 0,
        // Placement is what is measured; small writes keep the test fast.
        write_max_bytes: 64 << 10,
        zipf: ZipfSpec {
            region_bytes: 1 << 20,
            exponent,
        },
        ..WorkloadSpec::default()
    };
    let mut workload = Workload::new(11, spec, vec![disk(256 << 20, 4096)]);
    let mut counts = vec![0u64; 256];
    let mut data = Vec::new();
    let mut writes = 0;
    while writes < 20_000 {
        if let Op::Write {
            offset_bytes,
            length_bytes,
            ..
        } = workload.next_op(&mut data)
        {
            let region = offset_bytes >> 20;
            if pattern == Pattern::HotSpot {
                // A write never crosses its region (1 MiB regions, writes of at most 1 MiB).
                assert_eq!((offset_bytes + u64::from(length_bytes) - 1) >> 20, region);
            }
            counts[region as usize] += 1;
            writes += 1;
        }
    }
    counts
}

/// Share of the writes that land in the most-written 10 % of the regions.
fn top_tenth_share(mut counts: Vec<u64>) -> f64 {
    let total: u64 = counts.iter().sum();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top: u64 = counts[..counts.len() / 10].iter().sum();
    top as f64 / total as f64
}

#[test]
fn zipf_hot_spot_concentrates_writes() {
    // Zipf(256, 1.1) puts 69.8 % of the mass on the top 26 ranks; uniform about 10 %.
    let zipf = top_tenth_share(region_counts(Pattern::HotSpot, 1.1));
    let uniform = top_tenth_share(region_counts(Pattern::Uniform, 1.1));
    let steep = top_tenth_share(region_counts(Pattern::HotSpot, 2.0));
    assert!((0.66..0.74).contains(&zipf), "zipf 1.1: {zipf}");
    assert!(uniform < 0.2, "uniform: {uniform}");
    assert!(steep > 0.95, "zipf 2.0: {steep}");
    // The hottest region is not simply the first one: ranks are scattered over the disk.
    let counts = region_counts(Pattern::HotSpot, 1.1);
    let hottest = (0..counts.len()).max_by_key(|&r| counts[r]);
    let other_seed_hottest = {
        let spec = WorkloadSpec {
            pattern: Pattern::HotSpot,
            write_max_bytes: 64 << 10,
            ..WorkloadSpec::default()
        };
        let mut workload = Workload::new(12, spec, vec![disk(256 << 20, 4096)]);
        let mut counts = vec![0u64; 256];
        let mut data = Vec::new();
        for _ in 0..5000 {
            if let Op::Write { offset_bytes, .. } = workload.next_op(&mut data) {
                counts[(offset_bytes >> 20) as usize] += 1;
            }
        }
        (0..counts.len()).max_by_key(|&r| counts[r])
    };
    assert_ne!(hottest, other_seed_hottest, "the layout follows the seed");
}

#[test]
fn database_writes_the_log_sequentially_and_pages_elsewhere() {
    for block in [512u32, 4096] {
        let disks = vec![disk(8 << 20, 4096), disk(32 << 20, block)];
        let spec = WorkloadSpec {
            pattern: Pattern::Database,
            database: DatabaseSpec {
                log_disk: None,
                log_area_bytes: 1 << 20,
                log_write_percent: 60,
            },
            ..WorkloadSpec::default()
        };
        let mut workload = Workload::new(5, spec, disks.clone());
        let (log_disk, log_end) = workload.database_log().expect("database pattern");
        assert_eq!((log_disk, log_end), (1, 1 << 20), "the last disk, as asked");
        let mut data = Vec::new();
        let (mut log_writes, mut page_ops, mut wraps) = (0u64, 0u64, 0u64);
        let mut log_cursor = 0u64;
        for _ in 0..20_000 {
            let op = workload.next_op(&mut data);
            let Some((disk_index, offset, length)) = op.extent() else {
                continue;
            };
            if disk_index == log_disk && offset < log_end {
                // A log append: right after the previous one, or back at the start when the
                // next one would not fit.
                assert!(matches!(op, Op::Write { .. }), "the log is only written");
                assert!(length >= u64::from(block) && length <= DATABASE_LOG_WRITE_MAX_BYTES);
                assert!(length.is_multiple_of(u64::from(block)));
                assert!(offset + length <= log_end, "log write past the log");
                if offset != log_cursor {
                    assert_eq!(offset, 0, "log write out of sequence at {offset}");
                    assert!(log_cursor + length > log_end, "wrapped early");
                    wraps += 1;
                }
                log_cursor = offset + length;
                log_writes += 1;
            } else {
                assert!(length == DATABASE_PAGE_BYTES || length == 2 * DATABASE_PAGE_BYTES);
                assert!(offset.is_multiple_of(DATABASE_PAGE_BYTES));
                page_ops += 1;
            }
        }
        let share = log_writes as f64 / (log_writes + page_ops) as f64;
        assert!((0.55..0.65).contains(&share), "log share {share}");
        assert!(wraps > 0, "the log wrapped");
    }
}

#[test]
fn timed_bookmarks_fall_on_the_workload_clock() {
    let spec = WorkloadSpec {
        churn_bytes_per_s: 4 << 20,
        write_max_bytes: 64 << 10,
        ..WorkloadSpec::default()
    }
    .with_timed_bookmarks(100, 1000);
    let mut workload = Workload::new(3, spec, vec![disk(64 << 20, 512)]);
    let mut data = Vec::new();
    let (mut crash, mut app, mut written) = (0u64, 0u64, 0u64);
    let mut last_bookmark = Duration::ZERO;
    while workload.op_at() < Duration::from_secs(10) {
        let op = workload.next_op(&mut data);
        written += op.churn_bytes();
        if let Op::Bookmark { consistency, .. } = op
            && workload.op_at() < Duration::from_secs(10)
        {
            let at = workload.op_at();
            // Within one write (≤ 64 KiB at 4 MiB/s: 16 ms) after each 100 ms mark.
            assert!(at.as_millis() % 100 < 20, "bookmark at {at:?}");
            assert!(at - last_bookmark >= Duration::from_millis(80), "{at:?}");
            if consistency == Consistency::App {
                assert!(at.as_millis() % 1000 < 20, "app bookmark at {at:?}");
                app += 1;
            } else {
                crash += 1;
            }
            last_bookmark = at;
        }
    }
    assert_eq!(app, 9, "one app bookmark per second");
    assert_eq!(
        crash, 90,
        "a crash bookmark every 100 ms that is not an app one"
    );
    // The clock is the churn: 10 s at 4 MiB/s.
    let expected = 10.0 * f64::from(4u32 << 20);
    assert!(
        (written as f64 - expected).abs() / expected < 0.01,
        "{written}"
    );
}

#[test]
fn op_count_and_timed_bookmarks_work_together() {
    let spec = WorkloadSpec {
        churn_bytes_per_s: 1 << 20,
        crash_bookmark_every_ops: 10,
        app_bookmark_every_ops: 0,
        crash_bookmark_every_ms: 0,
        app_bookmark_every_ms: 500,
        ..WorkloadSpec::default()
    };
    let mut workload = Workload::new(3, spec, vec![disk(16 << 20, 4096)]);
    let mut data = Vec::new();
    let (mut crash, mut app) = (0, 0);
    for index in 1..=1000u64 {
        match workload.next_op(&mut data) {
            Op::Bookmark {
                consistency: Consistency::Crash,
                ..
            } => {
                assert!(index.is_multiple_of(10));
                crash += 1;
            }
            Op::Bookmark { .. } => app += 1,
            _ => {}
        }
    }
    assert_eq!(crash, 100);
    assert!(app > 10, "{app} app bookmarks");
}

/// Runs a workload through a pacer on a simulated clock until `min_bytes` are written;
/// returns (bytes, elapsed, largest gap between two writes). Each op "takes" `work` of the
/// delay it was given (simulated processing).
fn paced_run(
    workload: &mut Workload,
    pacer: &mut Pacer,
    min_bytes: u64,
    work_percent: u32,
) -> (u64, Duration, Duration) {
    let mut clock = ManualClock::new();
    let mut data = Vec::new();
    let (mut bytes, mut last_write, mut largest_gap) = (0u64, None::<Duration>, Duration::ZERO);
    let mut previous_wait = Duration::ZERO;
    while bytes < min_bytes {
        let op = workload.next_op(&mut data);
        // The previous op took part of its budget to process.
        clock.advance(previous_wait * work_percent / 100);
        previous_wait = pacer.pace(&mut clock, workload.op_at(), op.churn_bytes());
        if op.churn_bytes() > 0 {
            if let Some(last) = last_write {
                largest_gap = largest_gap.max(clock.now() - last);
            }
            last_write = Some(clock.now());
            bytes += op.churn_bytes();
        }
    }
    (bytes, clock.now(), largest_gap)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pacer_holds_the_target_rate_on_a_simulated_clock(
        seed in any::<u64>(),
        target in (256u64 << 10)..(1 << 30),
        pattern in prop::sample::select(vec![Pattern::Uniform, Pattern::HotSpot, Pattern::Database]),
        work_percent in 0u32..90,
    ) {
        let spec = WorkloadSpec {
            pattern,
            write_max_bytes: 256 << 10,
            ..WorkloadSpec::default()
        };
        let mut workload = Workload::new(seed, spec, vec![disk(64 << 20, 4096)]);
        let mut pacer = Pacer::new(target).with_burst_bytes(1 << 20);
        // Long enough that the initial bucket is under 5 % of the run.
        let min_bytes = pacer.burst_bytes() * 20;
        let (bytes, elapsed, _) = paced_run(&mut workload, &mut pacer, min_bytes, work_percent);
        let rate = bytes as f64 / elapsed.as_secs_f64();
        prop_assert!(
            (rate - target as f64).abs() / (target as f64) < 0.10,
            "rate {rate:.0} B/s for a target of {target} B/s"
        );
    }
}

#[test]
fn unlimited_pacer_never_sleeps() {
    let mut workload = Workload::new(1, WorkloadSpec::default(), vec![disk(16 << 20, 512)]);
    let mut pacer = Pacer::new(0);
    assert!(pacer.is_unlimited());
    let mut clock = ManualClock::new();
    let mut data = Vec::new();
    for _ in 0..2000 {
        let op = workload.next_op(&mut data);
        let wait = pacer.pace(&mut clock, workload.op_at(), op.churn_bytes());
        assert_eq!(wait, Duration::ZERO);
    }
    assert_eq!(clock.sleeps(), 0);
    assert_eq!(clock.now(), Duration::ZERO);
    // Also for a workload whose own spec says unlimited.
    assert!(Pacer::for_workload(&WorkloadSpec::default()).is_unlimited());
}

#[test]
fn bursty_workload_is_paced_in_bursts_and_idle_gaps_at_the_average_churn() {
    let churn = 2u64 << 20;
    let spec = WorkloadSpec {
        pattern: Pattern::Bursty,
        churn_bytes_per_s: churn,
        write_max_bytes: 64 << 10,
        burst: BurstSpec {
            burst_ms: 100,
            idle_ms: 400,
        },
        ..WorkloadSpec::default()
    };
    let mut pacer = Pacer::for_workload(&spec);
    let mut workload = Workload::new(8, spec, vec![disk(64 << 20, 4096)]);
    // 40 cycles of 500 ms.
    let (bytes, elapsed, largest_gap) = paced_run(&mut workload, &mut pacer, 40 * churn / 2, 50);
    let rate = bytes as f64 / elapsed.as_secs_f64();
    assert!(
        (rate - churn as f64).abs() / (churn as f64) < 0.10,
        "rate {rate:.0} B/s for {churn} B/s"
    );
    // The idle gaps are there (less the overshoot of the burst's last write)…
    assert!(
        largest_gap >= Duration::from_millis(350),
        "largest gap {largest_gap:?}"
    );

    // …and a burst runs at 5 × the churn: the bytes of the first 100 ms.
    let spec = workload.spec().clone();
    let mut workload = Workload::new(8, spec.clone(), vec![disk(64 << 20, 4096)]);
    let mut pacer = Pacer::for_workload(&spec);
    let mut clock = ManualClock::new();
    let mut data = Vec::new();
    let mut in_first_burst = 0u64;
    loop {
        let op = workload.next_op(&mut data);
        pacer.pace(&mut clock, workload.op_at(), op.churn_bytes());
        if clock.now() >= Duration::from_millis(100) {
            break;
        }
        in_first_burst += op.churn_bytes();
    }
    let burst_rate = in_first_burst as f64 / 0.1;
    assert!(
        (burst_rate / churn as f64 - 5.0).abs() < 0.5,
        "burst at {burst_rate:.0} B/s"
    );
}

#[test]
fn pacer_holds_a_target_below_the_workload_clock() {
    // A pacer slower than the workload's clock: the bucket sets the pace.
    let spec = WorkloadSpec {
        churn_bytes_per_s: 64 << 20,
        write_max_bytes: 64 << 10,
        ..WorkloadSpec::default()
    };
    let mut workload = Workload::new(2, spec, vec![disk(64 << 20, 512)]);
    let mut pacer = Pacer::new(1 << 20);
    let (bytes, elapsed, _) = paced_run(&mut workload, &mut pacer, 40 << 20, 0);
    let rate = bytes as f64 / elapsed.as_secs_f64();
    assert!((rate / f64::from(1u32 << 20) - 1.0).abs() < 0.10, "{rate}");
}
