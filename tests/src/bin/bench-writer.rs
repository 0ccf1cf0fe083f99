//! End-to-end writer benchmark: a long capture of unique events served by the test relay over a
//! local WebSocket, consumed by the real `firehose-writer` process with the durability rules on.
//!
//! `bench-writer WRITER_BINARY [FRAMES] [WORKDIR] [IN_NETWORK]` (release builds; see BENCHMARKS.md).
//! IN_NETWORK (default 1,000,000) sizes the in-network set, e.g. 0 to measure RSS without it.
//! The relay capture is looped (seq, repo and rev rewritten, so no event repeats) to FRAMES
//! frames (default 1,000,000). 1,000 study users and 1,000,000 in-network DIDs are loaded.
//! Prints frames/s from the first to the last committed cursor and the writer's RSS.
//!
//! `BENCH_SIGNED=1` re-signs every commit for its renamed repo (`LoopedCapture::signed`) and
//! writes the repos' DID documents to `WORKDIR/did_docs.json`, so a verifying writer verifies the
//! whole stream; `BENCH_WRITER_ARGS` adds writer flags (whitespace-separated; `{did_docs}` is
//! replaced by that file's path), e.g. `--verify routed --did-docs {did_docs} --backfill off`.
//! `BENCH_STREAM_CACHE=DIR` keeps the generated stream in DIR and reuses it on the next run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sync_core::frame::{capture_frames, decode_frame, Event};
use sync_core::synth;
use workspace_tests::procstat::{cpu_seconds, status_kb as rss_kb};
use workspace_tests::relay::TestRelay;

fn health_cursor(addr: &str) -> Option<i64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let json = body.split("\r\n\r\n").nth(1)?;
    serde_json::from_str::<serde_json::Value>(json).ok()?["cursor"].as_i64()
}

fn fake_did(i: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    let mut s = String::from("did:plc:");
    for _ in 0..24 {
        s.push(ALPHABET[(x % 32) as usize] as char);
        x = x.rotate_right(5) ^ i.wrapping_add(0x1234_5678);
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let writer = PathBuf::from(
        args.get(1)
            .expect("usage: bench-writer WRITER_BINARY [FRAMES] [WORKDIR]"),
    );
    let total: usize = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let work = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("bench-writer"));
    let in_network_size: usize = args
        .get(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let fixtures = workspace_tests::fixtures().expect("fixtures");
    let data = std::fs::read(fixtures.join("relay-capture/frames.bin")).unwrap();
    let raw: Vec<&[u8]> = capture_frames(&data).map(|f| f.unwrap()).collect();
    let dids: Vec<String> = raw
        .iter()
        .filter_map(|f| match decode_frame(f).ok()? {
            Event::Commit(c) => Some(c.repo.as_str().to_owned()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let t = Instant::now();
    let signed = std::env::var("BENCH_SIGNED").as_deref() == Ok("1");
    let did_docs = work.join("did_docs.json");
    // Signing a million commits takes minutes: `BENCH_STREAM_CACHE=DIR` keeps the generated
    // stream (and its DID documents) there for the next run. Only the generation is skipped:
    // the stream is the same bytes either way.
    let stream_cache = std::env::var_os("BENCH_STREAM_CACHE").map(|dir| {
        let name = format!(
            "stream-{total}-{}",
            if signed { "signed" } else { "unsigned" }
        );
        (
            PathBuf::from(&dir).join(format!("{name}.bin")),
            PathBuf::from(&dir).join(format!("{name}.did_docs.json")),
        )
    });
    let cached = stream_cache
        .as_ref()
        .and_then(|(frames, _)| std::fs::read(frames).ok());
    let frames: Vec<Vec<u8>> = match (&cached, &stream_cache) {
        (Some(bytes), Some((_, docs))) => {
            if signed {
                std::fs::copy(docs, &did_docs).expect("cached DID documents");
            }
            eprintln!(
                "stream read from {}",
                stream_cache.as_ref().unwrap().0.display()
            );
            capture_frames(bytes).map(|f| f.unwrap().to_vec()).collect()
        }
        _ => {
            let mut looped = synth::LoopedCapture::new(&raw, 1);
            if signed {
                looped = looped.signed();
            }
            let frames: Vec<Vec<u8>> = looped.by_ref().take(total).collect();
            if signed {
                // The PDS endpoint is never reached: the benchmark runs without backfill.
                let docs = looped.did_documents("https://pds.invalid");
                std::fs::write(&did_docs, docs.to_string()).unwrap();
                eprintln!(
                    "signed stream: {} DID documents in {}",
                    docs.as_object().map_or(0, |m| m.len()),
                    did_docs.display()
                );
            }
            if let Some((frames_path, docs)) = &stream_cache {
                std::fs::create_dir_all(frames_path.parent().unwrap()).unwrap();
                std::fs::write(frames_path, synth::capture(&frames)).unwrap();
                if signed {
                    std::fs::copy(&did_docs, docs).unwrap();
                }
            }
            frames
        }
    };
    let extra: Vec<String> = std::env::var("BENCH_WRITER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(|a| a.replace("{did_docs}", &did_docs.to_string_lossy()))
        .collect();
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let loops = total.div_ceil(raw.len()) as u32;
    eprintln!(
        "generated {} frames ({:.2} GB, {loops} loops) in {:.1} s",
        frames.len(),
        bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );

    // 1,000 study users: 10 capture accounts in each of the first 100 loops.
    let mut study: Vec<String> = (0..100u32)
        .flat_map(|n| dids.iter().take(10).map(move |d| synth::looped_did(d, n)))
        .collect();
    study.truncate(1000);
    // 1,000,000 in-network: 40 capture accounts in every loop, topped up with other DIDs.
    let mut in_network: Vec<String> = (0..loops)
        .flat_map(|n| {
            dids.iter()
                .skip(10)
                .take(40)
                .map(move |d| synth::looped_did(d, n))
        })
        .take(in_network_size)
        .collect();
    let mut i = 0;
    while in_network.len() < in_network_size {
        in_network.push(fake_did(i));
        i += 1;
    }
    std::fs::write(work.join("study.txt"), study.join("\n")).unwrap();
    std::fs::write(work.join("network.txt"), in_network.join("\n")).unwrap();

    let last_seq = frames.len() as i64;
    let relay = TestRelay::start(frames).await.unwrap();
    let metrics_addr = "127.0.0.1:19464";
    let mut child = Command::new(&writer)
        .args([
            "--relay",
            &relay.url(),
            "--cursor",
            "0",
            "--metrics-addr",
            metrics_addr,
            "--log-format",
            "json",
        ])
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .arg("--state")
        .arg(work.join("state.sqlite"))
        .arg("--study-users")
        .arg(work.join("study.txt"))
        .arg("--in-network")
        .arg(work.join("network.txt"))
        .args(&extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start writer");
    let pid = child.id();
    // Wait for the first commit (sets loaded), then time to the last.
    let started = Instant::now();
    let mut first: Option<(Instant, i64)> = None;
    let mut cpu_at_first = (0.0, 0.0);
    let mut rss_samples = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let c = health_cursor(metrics_addr);
        if let Some(c) = c {
            if first.is_none() {
                first = Some((Instant::now(), c));
                cpu_at_first = cpu_seconds(pid);
                eprintln!(
                    "first commit at seq {c} after {:.1} s (sets loaded); RSS {} MB",
                    started.elapsed().as_secs_f64(),
                    rss_kb(pid, "VmRSS:") / 1024
                );
            }
            rss_samples.push(rss_kb(pid, "VmRSS:"));
            if c >= last_seq {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(3600) {
            panic!("benchmark timed out");
        }
    }
    let (t0, c0) = first.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let peak = rss_kb(pid, "VmHWM:");
    let (user, system) = cpu_seconds(pid);
    let verify_metrics = metric_lines(metrics_addr, "firehose_verif");
    let barrier_metrics = metric_lines(metrics_addr, "firehose_commit_duration_seconds_");
    unsafe { libc_kill(pid) };
    let _ = child.wait();
    let files = count_files(&work.join("cache"));
    rss_samples.sort();
    println!("frames: {} ({:.2} GB)", last_seq - c0, bytes as f64 / 1e9);
    println!(
        "throughput: {:.0} frames/s ({:.1} MB/s) over {secs:.1} s",
        (last_seq - c0) as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    println!("cache files written: {files}");
    // User time is the writer's own work (decode, route, lookups); system time is mostly the
    // file system's, which follows the disk's state more than the binary's.
    println!(
        "writer CPU: {:.1} s (user {user:.1} s + system {system:.1} s, whole run including set loading)",
        user + system
    );
    // The timed window alone: what the stream cost, without the set loading before it.
    let (window_user, window_system) = (user - cpu_at_first.0, system - cpu_at_first.1);
    println!(
        "writer CPU in the timed window: {:.1} s (user {window_user:.1} s + system {window_system:.1} s), {:.0} % of the {} cores",
        window_user + window_system,
        100.0 * (window_user + window_system)
            / secs
            / std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "writer RSS: median {} MB, max sampled {} MB, peak (VmHWM) {} MB",
        rss_samples[rss_samples.len() / 2] / 1024,
        rss_samples.last().unwrap() / 1024,
        peak / 1024
    );
    if let Some(lines) = verify_metrics {
        println!("{lines}");
    }
    // Barriers (syncfs, renames, the SQLite commit): time the processor waits for the disk.
    if let Some(lines) = barrier_metrics {
        let value = |suffix: &str| {
            lines
                .lines()
                .find(|l| l.starts_with(&format!("firehose_commit_duration_seconds_{suffix} ")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(sum), Some(count)) = (value("sum"), value("count")) {
            println!(
                "barriers: {count:.0}, {sum:.1} s in all ({:.0} % of the timed window, whole run)",
                100.0 * sum / secs
            );
        }
    }
    relay.shutdown().await;
}

/// The `/metrics` sample lines whose name starts with `prefix` (None if the writer is gone).
fn metric_lines(addr: &str, prefix: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

unsafe fn libc_kill(pid: u32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid as i32, 15);
}

fn count_files(root: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}
