//! Backfill benchmark (issue 9): the real `firehose-writer` process backfilling study users
//! from the official PDS (`tests/pds`, `gapfree` scenario) on this machine.
//!
//! `bench-backfill WRITER_BINARY [REPOS] [RECORDS] [WORKDIR] [OPTIONS]` (release builds; see
//! BENCHMARKS.md, "Backfill from the local PDS").
//!
//! Phase 1 (skipped when REPOS is 0): REPOS accounts (default 100) with RECORDS posts each
//! (default 1,000; `bulk`, 200 creates to a commit), made before the writer starts; then the
//! writer runs with those DIDs as its study users, `--backfill on --verify routed` and a fresh
//! cache and state, from writer start until `firehose_repairs_completed_total{kind="backfill"}`
//! reaches REPOS and `firehose_resync_queue_depth` is 0. Runs, each with a fresh state:
//! `--runs N` (default 2) with `--pds-concurrency 8 --pds-rate 1000` (the PDS is measured, not
//! our limiter); one with the defaults `--pds-concurrency 4 --pds-rate 5` (`--no-limited-run`
//! skips it); and one with the fast limits and the study users' DID documents given in a
//! `--did-docs` file (no PLC lookups, which the writer rate-limits to 10/s; `--no-did-docs-run`
//! skips it).
//!
//! Phase 2 (`--large N`, default 100,000; 0 skips it): one more account with N posts, and
//! `--large-runs` (default 1) writer runs, fresh state, backfilling only that study user: time,
//! peak RSS (VmHWM), CPU time, and the size of the repo's CAR (`getRepo`, fetched once here).
//!
//! Setup time is printed but is not part of any measurement. Before each run the load average
//! is printed; after each, the writer's log is checked for ERROR lines, and it is SIGTERMed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use workspace_tests::pds::{self, Gapfree, Proc};
use workspace_tests::procstat::{cpu_seconds, status_kb};

/// How long one setup command (`accounts`, `bulk`) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest `bulk` command sent at once (the driver answers once per command).
const BULK_CHUNK: usize = 10_000;
/// How long one writer run may take before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

struct Options {
    writer: PathBuf,
    repos: usize,
    records: usize,
    work: PathBuf,
    runs: usize,
    limited_run: bool,
    did_docs_run: bool,
    large: usize,
    large_runs: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-backfill WRITER_BINARY [REPOS] [RECORDS] [WORKDIR] [--runs N] \
         [--no-limited-run] [--no-did-docs-run] [--large N] [--large-runs N]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut positional = Vec::new();
    let mut opts = Options {
        writer: PathBuf::new(),
        repos: 100,
        records: 1000,
        work: std::env::temp_dir().join("bench-backfill"),
        runs: 2,
        limited_run: true,
        did_docs_run: true,
        large: 100_000,
        large_runs: 1,
    };
    let mut args = std::env::args().skip(1);
    let number = |v: Option<String>| -> usize {
        v.and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or_else(|| usage())
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => opts.runs = number(args.next()),
            "--no-limited-run" => opts.limited_run = false,
            "--no-did-docs-run" => opts.did_docs_run = false,
            "--large" => opts.large = number(args.next()),
            "--large-runs" => opts.large_runs = number(args.next()),
            "-h" | "--help" => usage(),
            a if a.starts_with("--") => usage(),
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    opts.writer = PathBuf::from(positional.next().unwrap_or_else(|| usage()));
    if let Some(v) = positional.next() {
        opts.repos = number(Some(v));
    }
    if let Some(v) = positional.next() {
        opts.records = number(Some(v));
    }
    if let Some(v) = positional.next() {
        opts.work = PathBuf::from(v);
    }
    if positional.next().is_some() {
        usage();
    }
    opts
}

fn main() {
    let opts = parse_options();
    let toolchain = pds::toolchain().unwrap_or_else(|why| {
        eprintln!("{why}: run tests/setup.sh first");
        std::process::exit(2)
    });
    let _ = std::fs::remove_dir_all(&opts.work);
    std::fs::create_dir_all(&opts.work).expect("create the work directory");
    let writer = std::fs::canonicalize(&opts.writer).expect("the writer binary");
    println!(
        "machine: {} cores, {}; writer {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total(),
        writer.display()
    );
    println!("load average at the start: {}", load_average());

    let t = Instant::now();
    let mut net = Gapfree::start(&toolchain, &opts.work);
    println!(
        "PDS network ready in {:.1} s: pds {} plc {}",
        t.elapsed().as_secs_f64(),
        net.pds_url,
        net.plc_url
    );

    if opts.repos > 0 {
        phase_many(&mut net, &opts, &writer);
    }
    if opts.large > 0 {
        phase_large(&mut net, &opts, &writer);
    }
    net.stop();
}

/// Phase 1: REPOS repos of RECORDS posts each.
fn phase_many(net: &mut Gapfree, opts: &Options, writer: &Path) {
    println!(
        "\n== phase 1: {} repos of {} posts ==",
        opts.repos, opts.records
    );
    let setup = Instant::now();
    let answer = long_command(net, &format!("accounts B {}", opts.repos));
    let made: serde_json::Map<String, Value> = answer["accounts"]
        .as_object()
        .cloned()
        .expect("accounts in the answer");
    println!(
        "  {} accounts created in {:.1} s",
        made.len(),
        setup.elapsed().as_secs_f64()
    );
    let mut dids = Vec::new();
    for i in 1..=opts.repos {
        let label = format!("B{i}");
        dids.push(made[&label]["did"].as_str().expect("did").to_owned());
        bulk(net, &label, opts.records);
        if i % 10 == 0 || i == opts.repos {
            println!(
                "  {i} repos filled ({} posts) after {:.1} s",
                i * opts.records,
                setup.elapsed().as_secs_f64()
            );
        }
    }
    let cursor = net.last_seq_now();
    println!(
        "  setup (not measured): {:.1} s for {} accounts and {} posts; last seq {cursor}",
        setup.elapsed().as_secs_f64(),
        opts.repos,
        opts.repos * opts.records
    );

    // The PDS alone: every repo fetched once, one request at a time, by this process.
    let driver = net.driver.proc.pid();
    let node_before = cpu_total(driver);
    let t = Instant::now();
    let mut bytes = 0;
    for did in &dids {
        bytes += get_repo(&net.pds_url, did).0;
    }
    let secs = t.elapsed().as_secs_f64();
    let node = cpu_total(driver) - node_before;
    println!(
        "  the PDS alone: getRepo of the {} repos one after the other (plain HTTP GET, body \
         read and dropped): {secs:.2} s, {:.1} repos/s, {:.1} MB ({:.0} KB a repo); the PDS \
         process's CPU meanwhile {node:.2} s ({:.0} % of wall)",
        dids.len(),
        dids.len() as f64 / secs,
        bytes as f64 / 1e6,
        bytes as f64 / 1e3 / dids.len() as f64,
        100.0 * node / secs
    );

    // The same with 8 requests at once (as the writer's --pds-concurrency 8).
    let driver = net.driver.proc.pid();
    let node_before = cpu_total(driver);
    let t = Instant::now();
    let bytes = get_repos_parallel(&net.pds_url, &dids, 8);
    let secs = t.elapsed().as_secs_f64();
    let node = cpu_total(driver) - node_before;
    println!(
        "  the PDS alone, 8 requests at once: {secs:.2} s, {:.1} repos/s, {:.1} MB; the PDS \
         process's CPU meanwhile {node:.2} s ({:.0} % of wall)",
        dids.len() as f64 / secs,
        bytes as f64 / 1e6,
        100.0 * node / secs
    );

    let study = opts.work.join("study-many.txt");
    std::fs::write(&study, dids.join("\n") + "\n").expect("write the study users");
    let docs = if opts.did_docs_run {
        let path = opts.work.join("did-docs-many.json");
        write_did_docs(&net.plc_url, &dids, &path);
        Some(path)
    } else {
        None
    };
    let mut results = Vec::new();
    for n in 1..=opts.runs {
        let run = Run::new(net, &opts.work, &format!("many-{n}"), &study, dids.len());
        results.push(run.go(writer, 8, 1000, None));
    }
    if let Some(docs) = docs {
        let run = Run::new(net, &opts.work, "many-did-docs", &study, dids.len());
        results.push(run.go(writer, 8, 1000, Some(&docs)));
    }
    if opts.limited_run {
        let run = Run::new(net, &opts.work, "many-defaults", &study, dids.len());
        results.push(run.go(writer, 4, 5, None));
    }
    println!("\n  summary, phase 1 ({} repos):", dids.len());
    for r in &results {
        println!("  {}", r.line());
    }
}

/// Phase 2: one repo of `--large` posts.
fn phase_large(net: &mut Gapfree, opts: &Options, writer: &Path) {
    println!("\n== phase 2: one repo of {} posts ==", opts.large);
    let setup = Instant::now();
    let answer = long_command(net, "accounts L 1");
    let did = answer["accounts"]["L1"]["did"]
        .as_str()
        .expect("did of L1")
        .to_owned();
    let mut done = 0;
    while done < opts.large {
        let n = BULK_CHUNK.min(opts.large - done);
        bulk(net, "L1", n);
        done += n;
        println!(
            "  {done} posts after {:.1} s",
            setup.elapsed().as_secs_f64()
        );
    }
    net.last_seq_now();
    println!(
        "  setup (not measured): {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    let driver = net.driver.proc.pid();
    for n in 1..=3 {
        let node_before = cpu_total(driver);
        let t = Instant::now();
        let (bytes, content_type) = get_repo(&net.pds_url, &did);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  getRepo {did} (plain HTTP GET, try {n}): {bytes} bytes ({:.1} MB, {content_type}) \
             in {secs:.2} s; the PDS process's CPU meanwhile {:.2} s",
            bytes as f64 / 1e6,
            cpu_total(driver) - node_before
        );
    }
    let study = opts.work.join("study-large.txt");
    std::fs::write(&study, format!("{did}\n")).expect("write the study user");
    let mut results = Vec::new();
    for n in 1..=opts.large_runs {
        let run = Run::new(net, &opts.work, &format!("large-{n}"), &study, 1);
        results.push(run.go(writer, 8, 1000, None));
    }
    println!("\n  summary, phase 2 (1 repo of {} posts):", opts.large);
    for r in &results {
        println!("  {}", r.line());
    }
}

/// Sends a setup command with a long timeout; panics unless it succeeded.
fn long_command(net: &mut Gapfree, line: &str) -> Value {
    net.driver.send(line);
    let answer = net
        .driver
        .recv(SETUP_TIMEOUT, &format!("answer to {line:?}"));
    assert_eq!(
        answer["ok"],
        Value::Bool(true),
        "driver command {line:?} failed: {answer}"
    );
    answer
}

fn bulk(net: &mut Gapfree, label: &str, n: usize) {
    let answer = long_command(net, &format!("bulk {label} {n}"));
    assert_eq!(answer["count"].as_u64(), Some(n as u64), "bulk: {answer}");
}

/// One writer run: a fresh cache and state under `<work>/<name>`.
struct Run {
    name: String,
    dir: PathBuf,
    study: PathBuf,
    repos: usize,
    relay: String,
    plc: String,
    cursor: i64,
    /// The driver's Node process: the PDS and the PLC.
    driver: u32,
}

struct Outcome {
    name: String,
    limits: String,
    load: String,
    secs: f64,
    first_done: f64,
    repos: u64,
    records: u64,
    peak_rss_kb: u64,
    median_rss_kb: u64,
    user: f64,
    system: f64,
    errors: usize,
    failures: u64,
    /// CPU seconds of the PDS's Node process (PDS + PLC) during the run.
    node: f64,
}

impl Outcome {
    fn line(&self) -> String {
        let window = self.secs - self.first_done;
        format!(
            "{:<15} {:<22} load {:<15} {:>7.2} s  {:>6.1} repos/s  {:>8.0} records/s  \
             (first repo at {:.2} s; after it {:.1} repos/s)  CPU {:.2} s (user {:.2} + sys {:.2}) = {:.0} % of wall  \
             peak RSS {} MB (median sampled {} MB)  ERROR lines {}  repair failures {}  \
             PDS process CPU {:.2} s = {:.0} % of wall",
            self.name,
            self.limits,
            self.load,
            self.secs,
            self.repos as f64 / self.secs,
            self.records as f64 / self.secs,
            self.first_done,
            if window > 0.0 {
                (self.repos.saturating_sub(1)) as f64 / window
            } else {
                f64::NAN
            },
            self.user + self.system,
            self.user,
            self.system,
            100.0 * (self.user + self.system) / self.secs,
            self.peak_rss_kb / 1024,
            self.median_rss_kb / 1024,
            self.errors,
            self.failures,
            self.node,
            100.0 * self.node / self.secs
        )
    }
}

impl Run {
    fn new(net: &mut Gapfree, work: &Path, name: &str, study: &Path, repos: usize) -> Run {
        let dir = work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the run directory");
        Run {
            name: name.to_owned(),
            dir,
            study: study.to_owned(),
            repos,
            relay: net.ws.clone(),
            plc: net.plc_url.clone(),
            cursor: net.last_seq_now(),
            driver: net.driver.proc.pid(),
        }
    }

    fn go(self, writer: &Path, concurrency: u32, rate: u32, did_docs: Option<&Path>) -> Outcome {
        let port = workspace_tests::s3::free_port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let load = load_average();
        let limits = format!(
            "conc {concurrency} rate {rate}{}",
            if did_docs.is_some() { " did-docs" } else { "" }
        );
        println!(
            "\n  run {}: --pds-concurrency {concurrency} --pds-rate {rate}{}; load average {load}",
            self.name,
            if did_docs.is_some() {
                " --did-docs"
            } else {
                ""
            }
        );
        let mut cmd = Command::new(writer);
        cmd.arg("--relay")
            .arg(&self.relay)
            .arg("--cursor")
            .arg(self.cursor.to_string())
            .arg("--plc-url")
            .arg(&self.plc)
            .args(["--backfill", "on", "--verify", "routed"])
            .arg("--pds-concurrency")
            .arg(concurrency.to_string())
            .arg("--pds-rate")
            .arg(rate.to_string())
            .arg("--metrics-addr")
            .arg(&metrics_addr)
            .args(["--log-format", "json"])
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .arg("--state")
            .arg(self.dir.join("state.sqlite"))
            .arg("--study-users")
            .arg(&self.study)
            .stdout(Stdio::null());
        if let Some(docs) = did_docs {
            cmd.arg("--did-docs").arg(docs);
        }
        let node_before = cpu_total(self.driver);
        let started = Instant::now();
        let mut proc = Proc::spawn("writer", &mut cmd, self.dir.join("writer.log"));
        let pid = proc.pid();
        let want = self.repos as f64;
        let mut first_done = None;
        let mut rss = Vec::new();
        let (secs, metrics) = loop {
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                proc.alive(),
                "the writer exited during the run:\n{}",
                proc.log_tail(40)
            );
            rss.push(status_kb(pid, "VmRSS:"));
            let Some(text) = http_text(&metrics_addr, "/metrics") else {
                continue;
            };
            let elapsed = started.elapsed().as_secs_f64();
            let done =
                metric(&text, "firehose_repairs_completed_total", Some("backfill")).unwrap_or(0.0);
            if done > 0.0 && first_done.is_none() {
                first_done = Some(elapsed);
            }
            let depth = metric(&text, "firehose_resync_queue_depth", None).unwrap_or(f64::NAN);
            if done >= want && depth == 0.0 {
                break (elapsed, text);
            }
            assert!(
                started.elapsed() < RUN_TIMEOUT,
                "timed out: {done} of {want} repos after {elapsed:.0} s, queue {depth}"
            );
        };
        let node = cpu_total(self.driver) - node_before;
        let peak = status_kb(pid, "VmHWM:");
        let rss_end = status_kb(pid, "VmRSS:");
        let (user, system) = cpu_seconds(pid);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let status = proc.wait_exit(Duration::from_secs(60));
        let log = proc.log_text();
        drop(proc);

        let repaired = metric(
            &metrics,
            "firehose_repairs_completed_total",
            Some("backfill"),
        )
        .unwrap_or(0.0) as u64;
        let failures = metric_sum(&metrics, "firehose_repair_failures_total") as u64;
        let by_change = labelled(&metrics, "firehose_repair_records_total");
        let identity = labelled(&metrics, "firehose_identity_lookups_total");
        // Records read from the repos, from the writer's "repo repaired from its PDS" lines.
        let mut records = 0u64;
        let mut repaired_lines = 0;
        let mut errors = Vec::new();
        let mut warnings = 0;
        for line in log.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                if line.contains("ERROR") {
                    errors.push(line.to_owned());
                }
                continue;
            };
            match v["level"].as_str() {
                Some("ERROR") => errors.push(line.to_owned()),
                Some("WARN") => warnings += 1,
                _ => {}
            }
            if v["fields"]["message"] == "repo repaired from its PDS" {
                repaired_lines += 1;
                records += v["fields"]["records"].as_u64().unwrap_or(0);
            }
        }
        // Phases from the log's timestamps, in seconds after its first line: the last repo
        // fetched and verified, the last one applied.
        let phases = log_phases(&log);
        rss.sort_unstable();
        let outcome = Outcome {
            name: self.name.clone(),
            limits,
            load,
            secs,
            first_done: first_done.unwrap_or(secs),
            repos: repaired,
            records,
            peak_rss_kb: peak,
            median_rss_kb: rss.get(rss.len() / 2).copied().unwrap_or(0),
            user,
            system,
            errors: errors.len(),
            failures,
            node,
        };
        println!("    done: {}", outcome.line());
        println!(
            "    records read (log, {repaired_lines} repos): {records}; firehose_repair_records_total: {by_change:?}"
        );
        println!(
            "    identity lookups: {:?}",
            identity.iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>()
        );
        println!(
            "    from the writer's log (s after its first line): first queued {:.2}, first fetched \
             and verified {:.2}, last fetched and verified {:.2}, last applied {:.2}; RSS at the end {} MB",
            phases.first_queued,
            phases.first_fetched,
            phases.last_fetched,
            phases.last_applied,
            rss_end / 1024
        );
        println!(
            "    writer exit after SIGTERM: {status:?}; WARN lines {warnings}; ERROR lines {}",
            errors.len()
        );
        for e in errors.iter().take(5) {
            println!("    ERROR: {e}");
        }
        outcome
    }
}

#[derive(Default)]
struct Phases {
    first_queued: f64,
    first_fetched: f64,
    last_fetched: f64,
    last_applied: f64,
}

/// Seconds after the log's first line at which backfill steps were logged.
fn log_phases(log: &str) -> Phases {
    let mut start = None;
    let mut phases = Phases::default();
    let mut first_queued = None;
    let mut first_fetched = None;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(t) = v["timestamp"].as_str().and_then(seconds_of_day) else {
            continue;
        };
        let t = t - *start.get_or_insert(t);
        match v["fields"]["message"].as_str() {
            Some("study user queued for backfill") => {
                first_queued.get_or_insert(t);
            }
            Some("repo fetched and verified") => {
                first_fetched.get_or_insert(t);
                phases.last_fetched = t;
            }
            Some("repo repaired from its PDS") => phases.last_applied = t,
            _ => {}
        }
    }
    phases.first_queued = first_queued.unwrap_or(f64::NAN);
    phases.first_fetched = first_fetched.unwrap_or(f64::NAN);
    phases
}

/// `2026-12-02T06:47:58.189259Z` → seconds since that day's midnight (runs do not cross one).
fn seconds_of_day(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// `firehose_..{label="value"} N` or `name N`: the value of the first matching sample.
fn metric(text: &str, name: &str, label_value: Option<&str>) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        let matches = match label_value {
            None => key == name,
            Some(v) => key.starts_with(&format!("{name}{{")) && key.contains(&format!("=\"{v}\"")),
        };
        if matches {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Every sample of a labelled family: (label value, value).
fn labelled(text: &str, name: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once(' ')?;
            let label = labels.split('"').nth(1)?.to_owned();
            Some((label, value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn metric_sum(text: &str, name: &str) -> f64 {
    labelled(text, name).iter().map(|(_, v)| *v as f64).sum()
}

/// `GET path` over HTTP/1.0 (no chunked encoding), the body as text.
fn http_text(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    // hyper answers an HTTP/1.0 request as HTTP/1.0, Node as HTTP/1.1.
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_owned())
}

/// `GET <pds>/xrpc/com.atproto.sync.getRepo?did=DID` over HTTP/1.0: (body bytes, content type).
fn get_repo(pds_url: &str, did: &str) -> (usize, String) {
    let host = pds_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = TcpStream::connect(&host).expect("connect to the PDS");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("read timeout");
    write!(
        stream,
        "GET /xrpc/com.atproto.sync.getRepo?did={did} HTTP/1.0\r\nHost: {host}\r\n\r\n"
    )
    .expect("send getRepo");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read getRepo");
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header");
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    assert_eq!(
        head.split_whitespace().nth(1),
        Some("200"),
        "getRepo {did}: {head}"
    );
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "getRepo answered chunked: {head}"
    );
    let body = response.len() - end - 4;
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        assert_eq!(length, body, "getRepo {did}: body shorter than its length");
    }
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    (body, content_type)
}

/// [`get_repo`] of every DID, `parallel` requests at once: the bytes read.
fn get_repos_parallel(pds_url: &str, dids: &[String], parallel: usize) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let bytes = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(did) = dids.get(i) else { break };
                bytes.fetch_add(get_repo(pds_url, did).0, Ordering::Relaxed);
            });
        }
    });
    bytes.into_inner()
}

/// The DID documents of `dids` from the PLC, as the JSON object `--did-docs` reads.
fn write_did_docs(plc_url: &str, dids: &[String], path: &Path) {
    let host = plc_url.trim_start_matches("http://").trim_end_matches('/');
    let mut map = serde_json::Map::new();
    for did in dids {
        let text = http_text(host, &format!("/{did}")).expect("PLC document");
        let doc: Value = serde_json::from_str(&text).expect("PLC document JSON");
        map.insert(did.clone(), doc);
    }
    std::fs::write(path, Value::Object(map).to_string()).expect("write the DID documents");
}

fn cpu_total(pid: u32) -> f64 {
    let (user, system) = cpu_seconds(pid);
    user + system
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn mem_total() -> String {
    let kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    format!("{:.1} GiB RAM", kb as f64 / 1024.0 / 1024.0)
}
