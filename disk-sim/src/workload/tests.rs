//! Unit tests of the workload generator, the Zipf sampler and the pacer.

use super::patterns::{ZipfDisk, ZipfSampler};
use super::*;

fn disks() -> Vec<DiskGeometry> {
    vec![
        DiskGeometry {
            size_bytes: 8 << 20,
            block_size_bytes: 512,
        },
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
    ]
}

#[test]
fn workload_extents_are_aligned_and_inside_their_disk() {
    for pattern in Pattern::ALL {
        let spec = WorkloadSpec {
            pattern,
            ..WorkloadSpec::default()
        };
        let mut workload = Workload::new(3, spec, disks());
        let mut data = Vec::new();
        for _ in 0..2000 {
            let op = workload.next_op(&mut data);
            let Some((disk_index, offset_bytes, length_bytes)) = op.extent() else {
                continue;
            };
            if let Op::Write { length_bytes, .. } = op {
                assert_eq!(data.len(), length_bytes as usize);
            }
            let disk = disks()[usize::from(disk_index)];
            assert_eq!(disk.check_extent(offset_bytes, length_bytes), Ok(()));
        }
    }
}

#[test]
fn workload_same_seed_same_ops_and_bookmarks_at_interval() {
    let mut a = Workload::new(9, WorkloadSpec::default(), disks());
    let mut b = Workload::new(9, WorkloadSpec::default(), disks());
    let (mut data_a, mut data_b) = (Vec::new(), Vec::new());
    let mut bookmarks = 0;
    for _ in 0..400 {
        let op = a.next_op(&mut data_a);
        assert_eq!(op, b.next_op(&mut data_b));
        assert_eq!(data_a, data_b);
        if matches!(op, Op::Bookmark { .. }) {
            bookmarks += 1;
        }
    }
    assert_eq!(bookmarks, 8);
}

#[test]
fn zipf_sampler_ranks_stay_in_range_and_rank_one_is_most_frequent() {
    for (n, exponent) in [(1u64, 1.1), (2, 0.5), (100, 1.0), (1000, 1.1), (7, 3.0)] {
        let sampler = ZipfSampler::new(n, exponent);
        let mut rng = Rng::new(n);
        let mut counts = vec![0u64; n as usize + 1];
        for _ in 0..20_000 {
            let k = sampler.sample(&mut rng);
            assert!((1..=n).contains(&k));
            counts[k as usize] += 1;
        }
        let max = counts.iter().max().copied().unwrap_or(0);
        assert_eq!(counts[1], max, "n {n} exponent {exponent}");
    }
}

#[test]
fn zipf_sampler_matches_the_distribution() {
    // n = 10, s = 1: P(1) = 1 / H(10) ≈ 0.3414.
    let sampler = ZipfSampler::new(10, 1.0);
    let mut rng = Rng::new(5);
    let hits = (0..100_000)
        .filter(|_| sampler.sample(&mut rng) == 1)
        .count();
    let share = hits as f64 / 100_000.0;
    assert!((share - 0.3414).abs() < 0.01, "{share}");
}

#[test]
fn zipf_permutation_is_a_bijection() {
    let mut rng = Rng::new(1);
    let disk = DiskGeometry {
        size_bytes: 100 << 20,
        block_size_bytes: 512,
    };
    let zipf = ZipfDisk::new(&mut rng, disk, ZipfSpec::default());
    let mut seen = vec![false; zipf.regions as usize];
    for rank in 1..=zipf.regions {
        let region = zipf.region_of_rank(rank) as usize;
        assert!(!seen[region]);
        seen[region] = true;
    }
}

#[test]
fn pacer_charges_a_caller_that_did_not_wait() {
    let mut pacer = Pacer::new(1 << 20).with_burst_bytes(1 << 20);
    let now = Duration::from_secs(1);
    assert_eq!(pacer.delay(now, 1 << 20), Duration::ZERO);
    assert_eq!(pacer.delay(now, 1 << 20), Duration::from_secs(1));
    // Asked again at the same instant: the second op's second is still owed.
    assert_eq!(pacer.delay(now, 1 << 20), Duration::from_secs(2));
    assert_eq!(
        pacer.delay(now + Duration::from_secs(2), 1 << 19),
        Duration::from_millis(500)
    );
}
