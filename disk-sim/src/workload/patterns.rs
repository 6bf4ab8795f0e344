//! Where the patterns put writes: the hot spot's Zipf layout, the database's log area,
//! and the bytes of compressible data.

use engine::delta::DiskGeometry;

use super::spec::{
    DATABASE_LOG_WRITE_MAX_BYTES, DATABASE_PAGE_BYTES, DatabaseSpec, MIN_WRITE_BYTES, ZipfSpec,
};
use crate::rng::Rng;

/// A disk's write granule: its logical block size, at least [`MIN_WRITE_BYTES`].
pub(super) fn block_bytes(disk: DiskGeometry) -> u64 {
    u64::from(disk.block_size_bytes.max(MIN_WRITE_BYTES))
}

/// The database pattern's layout, fixed at construction.
#[derive(Debug, Clone, Copy)]
pub(super) struct DatabaseLayout {
    pub(super) log_disk: usize,
    /// The log is `0..log_end_bytes` of the log disk.
    pub(super) log_end_bytes: u64,
}

impl DatabaseLayout {
    pub(super) fn new(disks: &[DiskGeometry], spec: DatabaseSpec) -> Self {
        let last = disks.len() - 1;
        let log_disk = spec
            .log_disk
            .map_or(last, |index| usize::from(index).min(last));
        let disk = disks[log_disk];
        let block = block_bytes(disk);
        let quarter = (disk.size_bytes / 4) / DATABASE_PAGE_BYTES * DATABASE_PAGE_BYTES;
        let smallest = DATABASE_LOG_WRITE_MAX_BYTES
            .next_multiple_of(block)
            .min(disk.size_bytes);
        let log_end_bytes = (spec.log_area_bytes / DATABASE_PAGE_BYTES * DATABASE_PAGE_BYTES)
            .min(quarter)
            .max(smallest);
        Self {
            log_disk,
            log_end_bytes,
        }
    }
}

/// One disk's hot-spot layout: regions, the Zipf sampler over their ranks, and the seeded
/// permutation from rank to region.
#[derive(Debug, Clone)]
pub(super) struct ZipfDisk {
    pub(super) region_bytes: u64,
    pub(super) regions: u64,
    pub(super) sampler: ZipfSampler,
    /// Rank `k` (1-based) is region `(multiplier × (k − 1) + shift) mod regions`.
    multiplier: u64,
    shift: u64,
}

impl ZipfDisk {
    pub(super) fn new(rng: &mut Rng, disk: DiskGeometry, spec: ZipfSpec) -> Self {
        let block = u64::from(disk.block_size_bytes).max(1);
        let region_bytes = spec.region_bytes.max(block).next_multiple_of(block);
        let regions = disk.size_bytes.div_ceil(region_bytes).max(1);
        let exponent = if spec.exponent.is_finite() && spec.exponent > 0.0 {
            spec.exponent
        } else {
            ZipfSpec::default().exponent
        };
        let multiplier = if regions == 1 {
            1
        } else {
            loop {
                let candidate = 1 + rng.below(regions - 1);
                if gcd(candidate, regions) == 1 {
                    break candidate;
                }
            }
        };
        Self {
            region_bytes,
            regions,
            sampler: ZipfSampler::new(regions, exponent),
            multiplier,
            shift: rng.below(regions),
        }
    }

    pub(super) fn region_of_rank(&self, rank: u64) -> u64 {
        let at = u128::from(self.multiplier) * u128::from(rank - 1) + u128::from(self.shift);
        (at % u128::from(self.regions)) as u64
    }
}

pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Zipf sampling over ranks `1..=n` by rejection-inversion (W. Hörmann, G. Derflinger,
/// "Rejection-inversion to generate variates from monotone discrete distributions", 1996;
/// as in Apache Commons RNG): O(1) memory and expected time for any `n` and exponent > 0.
#[derive(Debug, Clone)]
pub(super) struct ZipfSampler {
    n: u64,
    exponent: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl ZipfSampler {
    pub(super) fn new(n: u64, exponent: f64) -> Self {
        let mut sampler = Self {
            n,
            exponent,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            s: 0.0,
        };
        sampler.h_integral_x1 = sampler.h_integral(1.5) - 1.0;
        sampler.h_integral_n = sampler.h_integral(n as f64 + 0.5);
        sampler.s = 2.0 - sampler.h_integral_inverse(sampler.h_integral(2.5) - sampler.h(2.0));
        sampler
    }

    pub(super) fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let uniform = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let u = self.h_integral_n + uniform * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            // `as` saturates (and maps NaN to 0), then the clamp keeps the rank in range.
            let k = ((x + 0.5) as u64).clamp(1, self.n);
            if k as f64 - x <= self.s || u >= self.h_integral(k as f64 + 0.5) - self.h(k as f64) {
                return k;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.exponent * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.exponent) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.exponent)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x − 1) / x`, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// Data that compresses like real guest data: runs of zeros and a repeated seeded phrase.
pub(super) fn fill_compressible(rng: &mut Rng, out: &mut [u8]) {
    let mut phrase = [0u8; 64];
    rng.fill(&mut phrase);
    for (index, chunk) in out.chunks_mut(512).enumerate() {
        if index % 4 == 0 {
            chunk.fill(0);
        } else {
            for (at, byte) in chunk.iter_mut().enumerate() {
                *byte = phrase[at % phrase.len()];
            }
        }
    }
}
