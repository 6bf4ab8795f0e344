//! `resync`: how fast `engine::resync` hashes a disk, next to fio reading the same file, and
//! how many bytes a diff sends next to the bytes that really differ.
//!
//! ```text
//!  hash rate   engine   drop the file's page cache ─► hash_path(file): 64 KiB chunks, one
//!                       4 MiB buffer, buffered pread on one thread (kernel readahead)
//!              fio      --rw=read --bs=1M --direct=1 --ioengine=io_uring --iodepth=1
//!              order    fio #1, engine #1, fio #2, …  (ratio: median engine / median fio)
//!              diag     hash_path again with the whole file in the page cache (hashing alone)
//!
//!  bytes sent  A = seeded random image, B = copy of A; change one random 4 KiB block in each
//!              chunk of a seeded 1 % of A's chunks, hash B, diff(A, B); then 10 % (a superset)
//!              sent      = Σ bytes of ChunkRange::pieces(64 KiB, 1 MiB) of the diff
//!              differing = chunks that differ byte for byte (A and B compared directly,
//!                          no hashes) × their length
//!              ratio     = sent / differing                    goal ≤ 1.1
//!              also      wire = sent + 48 B per piece (resync-block frame header) + one hash
//!                        list (the replica's, sent to the source agent); and the 4 KiB
//!                        blocks and bytes that really differ
//! ```
//!
//! The diff's ratio is 1.0 unless the diff sends chunks that do not differ (or misses some,
//! which shows as a ratio below 1 and as an error here): chunk granularity is the design, so
//! the 4 KiB figures say what a smaller chunk would save, not a defect.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::delta::FRAME_HEADER_BYTES;
use engine::resync::{ChunkHashes, ResyncOptions, diff, hash_path};

use crate::cpu;
use crate::fio::{Fio, FioJob};
use crate::histogram::LatencyHistogram;
use crate::machine::{Scratch, drop_page_cache};
use crate::report::{Bench, Goal, Row, Side};
use crate::series::IntervalBytes;
use crate::workload::{Offsets, Rng, offsets};

/// Largest resync-block payload the source agent sends (disk-sim's `MAX_RESYNC_PIECE_BYTES`).
const MAX_PIECE_BYTES: u64 = 1 << 20;
/// Size of the changes made inside a chunk.
const CHANGE_BYTES: u64 = 4096;
const MIB: f64 = 1024.0 * 1024.0;

/// Hashes `path` once (cold unless `warm`), returning the row and the hashes.
fn hash_run(path: &Path, label: &str, warm: bool) -> Result<(Row, ChunkHashes)> {
    if !warm {
        drop_page_cache(path)?;
    }
    let options = ResyncOptions::default();
    let mut buffers = LatencyHistogram::new();
    let mut series = IntervalBytes::starting_now();
    let cpu_before = cpu::process()?;
    let started = Instant::now();
    let mut last = started;
    let hashes = hash_path(
        path,
        &options,
        &mut |done| {
            let now = Instant::now();
            buffers.observe(now.duration_since(last));
            series.add_total(now, done);
            last = now;
        },
        &|| false,
    )?;
    let ended = Instant::now();
    let elapsed_s = ended.duration_since(started).as_secs_f64();
    let cpu = cpu::process()?.since(&cpu_before);
    let row = Row::engine(
        label,
        hashes.disk_size_bytes,
        hashes.chunk_count(),
        elapsed_s,
    )
    .with_cpu(cpu)
    .with_histogram(
        format!(
            "{} MiB buffer: read + hash",
            options.read_buffer_bytes >> 20
        ),
        &buffers,
    )
    .with_intervals(Some(series.finish(ended)));
    Ok((row, hashes))
}

/// The hash-rate table over `file` (`file_bytes` long).
pub fn hash_rate(
    fio: &Fio,
    file: &Path,
    file_bytes: u64,
    repeats: usize,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let title = format!("resync hash rate, {} MiB file", file_bytes >> 20);
    let mut bench = Bench::new("resync", &title);
    let options = ResyncOptions::default();
    bench.param("file_bytes", file_bytes);
    bench.param("chunk_bytes", options.chunk_size_bytes);
    bench.param("read_buffer_bytes", options.read_buffer_bytes);
    let job = FioJob {
        name: "resync-read".into(),
        args: vec![
            format!("--filename={}", file.display()),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            "--rw=read".into(),
            "--bs=1M".into(),
            "--iodepth=1".into(),
            format!("--size={file_bytes}"),
        ],
    };
    let group = "engine, hash_path";
    progress!("[{title}] fio #1");
    bench.rows.push(Row::fio("fio", &fio.run(&job)?).run(1));
    for run in 1..=repeats {
        progress!("[{title}] {group} #{run}");
        let (row, hashes) = hash_run(file, group, false)?;
        if hashes.disk_size_bytes != file_bytes {
            bail!(
                "hash_path saw {} bytes, the file has {file_bytes}",
                hashes.disk_size_bytes
            );
        }
        bench.rows.push(row.run(run));
        progress!("[{title}] fio #{}", run + 1);
        bench
            .rows
            .push(Row::fio("fio", &fio.run(&job)?).run(run + 1));
    }
    progress!("[{title}] diag: hash_path, page cache warm");
    // Read once more so the whole file is cached, then time the hashing alone.
    hash_run(file, "warm-up", true)?;
    let (mut warm, _) = hash_run(file, "diag: hash_path, file in the page cache", true)?;
    warm.side = Side::Diag;
    bench.rows.push(warm);
    drop_page_cache(file)?;
    lines.push(bench.add_ratio("hash rate vs fio read", group, None));
    bench.notes.push(
        "engine: engine::resync::hash_path (XXH3-64 per 64 KiB chunk, one 4 MiB buffer, \
         buffered pread with the kernel's readahead, one thread) with the file's page cache \
         dropped before each run; fio: O_DIRECT 1 MiB reads at queue depth 1 (one synchronous \
         reader, like hash_path). The diag row hashes the file from the page cache: the \
         hashing's own cost"
            .into(),
    );
    Ok(bench)
}

/// Byte-for-byte comparison of two equally long files: (chunks differing, their bytes,
/// 4 KiB blocks differing, bytes differing).
fn compare(a: &Path, b: &Path, len: u64, chunk_bytes: u64) -> Result<(u64, u64, u64, u64)> {
    const BUF: usize = 4 << 20;
    let fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; BUF], vec![0u8; BUF]);
    let (mut chunks, mut chunk_bytes_total, mut blocks, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(BUF as u64) as usize;
        fa.read_exact_at(&mut ba[..n], offset)?;
        fb.read_exact_at(&mut bb[..n], offset)?;
        // BUF is a multiple of the chunk size, so chunks never straddle two reads.
        for (ca, cb) in ba[..n]
            .chunks(chunk_bytes as usize)
            .zip(bb[..n].chunks(chunk_bytes as usize))
        {
            if ca != cb {
                chunks += 1;
                chunk_bytes_total += ca.len() as u64;
                for (xa, xb) in ca
                    .chunks(CHANGE_BYTES as usize)
                    .zip(cb.chunks(CHANGE_BYTES as usize))
                {
                    if xa != xb {
                        blocks += 1;
                        bytes += xa.iter().zip(xb).filter(|(x, y)| x != y).count() as u64;
                    }
                }
            }
        }
        offset += n as u64;
    }
    Ok((chunks, chunk_bytes_total, blocks, bytes))
}

/// The bytes-sent table: images of `image_bytes`, 1 % then 10 % of their chunks changed.
pub fn bytes_sent(scratch: &Scratch, image_bytes: u64, lines: &mut Vec<String>) -> Result<Bench> {
    let title = format!("resync bytes sent, {} MiB image", image_bytes >> 20);
    let mut bench = Bench::new("resync", &title);
    let options = ResyncOptions::default();
    let chunk = u64::from(options.chunk_size_bytes);
    if !image_bytes.is_multiple_of(chunk) || image_bytes < 100 * chunk {
        bail!("the resync image must be ≥ 100 chunks of {chunk} bytes, not {image_bytes}");
    }
    bench.param("image_bytes", image_bytes);
    bench.param("chunk_bytes", chunk);
    bench.param("max_piece_bytes", MAX_PIECE_BYTES);
    let work = scratch.join("resync");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let (a, b) = (work.join("a.img"), work.join("b.img"));
    progress!("[{title}] writing the two images");
    {
        let file = File::create(&a).with_context(|| format!("creating {}", a.display()))?;
        let mut rng = Rng::new(0xa11e);
        let mut buf = vec![0u8; 4 << 20];
        let mut offset = 0u64;
        while offset < image_bytes {
            let n = (image_bytes - offset).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            file.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
        }
    }
    std::fs::copy(&a, &b).with_context(|| format!("copying {}", a.display()))?;
    let hashes_a = hash_path(&a, &options, &mut |_| {}, &|| false)?;
    let chunks = image_bytes / chunk;
    let changed = offsets(
        Offsets::Random { seed: 0xd1ff },
        chunk,
        image_bytes,
        chunks / 10,
    )?;
    let fb = std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .with_context(|| format!("opening {}", b.display()))?;
    let mut rng = Rng::new(0xc4a9);
    let mut block = vec![0u8; CHANGE_BYTES as usize];
    let mut done = 0usize;
    for percent in [1u64, 10] {
        let upto = (chunks * percent).div_ceil(100) as usize;
        for &chunk_offset in &changed[done..upto.min(changed.len())] {
            let within = rng.below(chunk / CHANGE_BYTES) * CHANGE_BYTES;
            rng.fill(&mut block);
            fb.write_all_at(&block, chunk_offset + within)?;
        }
        done = upto.min(changed.len());
        progress!("[{title}] {percent} %: hash, diff, compare");
        let started = Instant::now();
        let hashes_b = hash_path(&b, &options, &mut |_| {}, &|| false)?;
        let ranges = diff(&hashes_a, &hashes_b)?;
        let diff_s = started.elapsed().as_secs_f64();
        let (mut sent, mut pieces) = (0u64, 0u64);
        for range in &ranges {
            for (_, len) in range.pieces(options.chunk_size_bytes, MAX_PIECE_BYTES) {
                sent += len;
                pieces += 1;
            }
        }
        let (diff_chunks, diff_chunk_bytes, diff_blocks, diff_bytes) =
            compare(&a, &b, image_bytes, chunk)?;
        if sent < diff_chunk_bytes {
            bail!(
                "{percent} %: the diff covers {sent} bytes, but {diff_chunk_bytes} bytes of \
                 chunks differ: it misses changes"
            );
        }
        // One hash list travels (the replica's, to the source agent).
        let hash_list = hashes_a.encoded_len_bytes() as u64;
        let wire = sent + pieces * FRAME_HEADER_BYTES as u64 + hash_list;
        let p = format!("p{percent}");
        bench.param(&format!("{p}_chunks_changed"), done);
        bench.param(&format!("{p}_chunks_differing"), diff_chunks);
        bench.param(&format!("{p}_ranges"), ranges.len());
        bench.param(&format!("{p}_pieces"), pieces);
        bench.param(&format!("{p}_bytes_sent"), sent);
        bench.param(&format!("{p}_bytes_differing_chunks"), diff_chunk_bytes);
        bench.param(
            &format!("{p}_bytes_differing_4k_blocks"),
            diff_blocks * CHANGE_BYTES,
        );
        bench.param(&format!("{p}_bytes_differing_exact"), diff_bytes);
        bench.param(&format!("{p}_wire_bytes"), wire);
        bench.param(&format!("{p}_hash_and_diff_s"), diff_s);
        lines.push(bench.add_value_ratio(
            &format!("sent / differing, {percent} %"),
            ("sent", sent as f64 / MIB),
            ("differing chunks", diff_chunk_bytes as f64 / MIB),
            Some(Goal::AtMost(1.1)),
        ));
        lines.push(bench.add_value_ratio(
            &format!("wire / differing, {percent} %"),
            ("wire", wire as f64 / MIB),
            ("differing chunks", diff_chunk_bytes as f64 / MIB),
            None,
        ));
    }
    drop(fb);
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    bench.notes.push(format!(
        "one random 4 KiB block changed in each chosen chunk; the 10 % set contains the 1 % \
         set. sent: bytes of the diff's pieces (≤ {} KiB each, as the source agent frames \
         them); wire adds a {FRAME_HEADER_BYTES}-byte frame header per piece and the replica's \
         hash list; the pNN_bytes_differing_4k_blocks and _exact parameters say what a finer \
         chunk could save",
        MAX_PIECE_BYTES >> 10
    ));
    Ok(bench)
}
