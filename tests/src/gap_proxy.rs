//! A gap proxy: subscribes to an upstream `com.atproto.sync.subscribeRepos` (e.g. the official
//! PDS of `tests/pds`) and republishes its frames through a [`TestRelay`], frame by frame under
//! the test's control: drop frames that match a rule (a relay that skipped a commit), replace
//! a frame by others in its position (a forged commit that reuses the dropped frame's seq),
//! inject extra frames, and report the fate of every frame.
//!
//! The writer connects to [`GapProxy::url`]; the relay keeps its cursor / replay / live-tail
//! semantics and its [`crate::relay::Fault`]s ([`GapProxy::relay`]). Rules apply to frames as
//! they arrive from upstream, so set a rule before making the commit it must catch.
//!
//! ```no_run
//! # async fn demo(pds_ws: &str, s1: &str) -> std::io::Result<()> {
//! use std::time::Duration;
//! use workspace_tests::gap_proxy::{forge_commit, GapProxy, Rule};
//! let proxy = GapProxy::start(pds_ws, Some(0)).await?;
//! proxy.add_rule(Rule::drop_next_commits(s1, 1)); // a relay that skips S1's next commit
//! proxy.add_rule(Rule::replace_next_commit(s1, |info| {
//!     // S1's commit after that: a well-formed commit signed by another key, same seq
//!     vec![forge_commit(&info.did.clone().unwrap(), info.seq.unwrap(), "forged")]
//! }));
//! // ... start the writer with `--relay {proxy.url()}` ...
//! assert!(proxy.wait_for_upstream_seq(42, Duration::from_secs(30)).await);
//! assert_eq!(proxy.dropped().len(), 1);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use sync_core::frame::{decode_frame, Event};
use sync_core::synth::{OpSpec, SynthRepo};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::relay::{TestRelay, SUBSCRIBE_PATH};

/// The secret key of [`forge_commit`]'s signer: not any account's key.
pub const FORGER_SECRET: [u8; 32] = [7; 32];

/// What a frame is, as far as rules need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    /// `seq`, when the frame decodes and has one.
    pub seq: Option<i64>,
    /// `commit`, `sync`, `identity`, `account`, `info`, `error`, ... ([`Event::kind`]), or
    /// `undecodable`.
    pub kind: String,
    /// The repo of a `#commit`, the DID of `#sync`, `#identity`, `#account`.
    pub did: Option<String>,
    /// The rev of a `#commit` or `#sync`.
    pub rev: Option<String>,
    /// The event's `time`.
    pub time: Option<String>,
    /// A commit's ops as `"<action> <collection>/<rkey>"` (readable ones only).
    pub ops: Vec<String>,
}

impl FrameInfo {
    /// Reads what rules need from a frame (never fails: undecodable bytes are `undecodable`).
    pub fn of(frame: &[u8]) -> FrameInfo {
        let mut info = FrameInfo {
            seq: None,
            kind: "undecodable".to_owned(),
            did: None,
            rev: None,
            time: None,
            ops: Vec::new(),
        };
        let Ok(event) = decode_frame(frame) else {
            return info;
        };
        info.seq = event.seq().map(|s| s.0);
        info.kind = event.kind().to_owned();
        match &event {
            Event::Commit(c) => {
                info.did = Some(c.repo.as_str().to_owned());
                info.rev = Some(c.rev.as_str().to_owned());
                info.time = Some(c.time.to_owned());
                info.ops = c
                    .ops
                    .iter()
                    .flatten()
                    .map(|op| {
                        format!(
                            "{} {}/{}",
                            op.action.as_str(),
                            op.collection.as_str(),
                            op.rkey.as_str()
                        )
                    })
                    .collect();
            }
            Event::Sync(s) => {
                info.did = Some(s.did.as_str().to_owned());
                info.rev = Some(s.rev.as_str().to_owned());
                info.time = Some(s.time.clone());
            }
            Event::Identity(i) => {
                info.did = Some(i.did.as_str().to_owned());
                info.time = Some(i.time.clone());
            }
            Event::Account(a) => {
                info.did = Some(a.did.as_str().to_owned());
                info.time = Some(a.time.clone());
            }
            Event::Info(i) => info.kind = format!("info:{}", i.name),
            Event::Error(e) => info.kind = format!("error:{}", e.error),
            Event::Skipped { .. } => {}
        }
        info
    }

    /// A `#commit` of `did`.
    pub fn is_commit_of(&self, did: &str) -> bool {
        self.kind == "commit" && self.did.as_deref() == Some(did)
    }
}

type Matcher = Box<dyn FnMut(&FrameInfo) -> bool + Send>;
type Replacer = Box<dyn FnMut(&FrameInfo, &[u8]) -> Vec<Vec<u8>> + Send>;

/// What a rule does with a frame it matches.
pub enum Action {
    /// The frame is not forwarded.
    Drop,
    /// The frame is not forwarded; the frames the function returns are, in its position (none
    /// is the same as dropping). Give them seqs that fit the stream, e.g. the replaced frame's.
    Replace(Replacer),
}

/// A rule: frames that match (`matcher`), at most `times` of them (`None`: all), get `action`.
/// Rules are tried in the order they were added; the first live rule that matches decides, and
/// a frame no rule matches is forwarded as it is.
pub struct Rule {
    pub name: String,
    matcher: Matcher,
    pub action: Action,
    pub times: Option<usize>,
}

impl Rule {
    /// A rule from parts.
    pub fn new(
        name: impl Into<String>,
        matcher: impl FnMut(&FrameInfo) -> bool + Send + 'static,
        action: Action,
        times: Option<usize>,
    ) -> Rule {
        Rule {
            name: name.into(),
            matcher: Box::new(matcher),
            action,
            times,
        }
    }

    /// Drops every frame that matches.
    pub fn drop_when(
        name: impl Into<String>,
        matcher: impl FnMut(&FrameInfo) -> bool + Send + 'static,
    ) -> Rule {
        Rule::new(name, matcher, Action::Drop, None)
    }

    /// Drops the frame with this seq.
    pub fn drop_seq(seq: i64) -> Rule {
        Rule::new(
            format!("drop seq {seq}"),
            move |f| f.seq == Some(seq),
            Action::Drop,
            Some(1),
        )
    }

    /// Drops the commit of `did` at `rev`.
    pub fn drop_commit(did: &str, rev: &str) -> Rule {
        let (did, rev) = (did.to_owned(), rev.to_owned());
        Rule::new(
            format!("drop commit {did} {rev}"),
            move |f| f.is_commit_of(&did) && f.rev.as_deref() == Some(rev.as_str()),
            Action::Drop,
            Some(1),
        )
    }

    /// Drops the next `n` `#commit` frames of `did` (set it before making the commits).
    pub fn drop_next_commits(did: &str, n: usize) -> Rule {
        let did = did.to_owned();
        Rule::new(
            format!("drop next {n} commits of {did}"),
            move |f| f.is_commit_of(&did),
            Action::Drop,
            Some(n),
        )
    }

    /// Replaces the next `#commit` of `did` by what `make` returns (e.g. [`forge_commit`] with
    /// the replaced frame's seq).
    pub fn replace_next_commit(
        did: &str,
        mut make: impl FnMut(&FrameInfo) -> Vec<Vec<u8>> + Send + 'static,
    ) -> Rule {
        let did = did.to_owned();
        Rule::new(
            format!("replace next commit of {did}"),
            move |f| f.is_commit_of(&did),
            Action::Replace(Box::new(move |info, _| make(info))),
            Some(1),
        )
    }

    fn live(&self) -> bool {
        self.times != Some(0)
    }
}

/// What became of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Forwarded as it came.
    Forwarded,
    /// Dropped by the named rule.
    Dropped { rule: String },
    /// Replaced by the named rule with these frames (their infos).
    Replaced { rule: String, with: Vec<FrameInfo> },
    /// Not from upstream: pushed by [`GapProxy::inject`].
    Injected,
}

/// One line of the proxy's report, in the order frames were handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub info: FrameInfo,
    pub fate: Fate,
}

struct State {
    rules: Vec<Rule>,
    report: Vec<Handled>,
    /// The highest upstream seq handled (forwarded, dropped or replaced).
    upstream_seq: Option<i64>,
    /// Why the upstream connection ended last, if it did.
    last_upstream_error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every upstream frame is handled (wakes `wait_*`).
    handled_tx: watch::Sender<usize>,
    upstream_connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running gap proxy. Dropping it stops the upstream subscription and the relay.
pub struct GapProxy {
    /// `Some` until [`GapProxy::shutdown`].
    relay: Option<TestRelay>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

/// `ws://host:port` or a full subscribeRepos URL → the subscribeRepos URL without a query.
fn subscribe_url(upstream: &str) -> String {
    let base = upstream.split('?').next().unwrap_or(upstream);
    if base.ends_with(SUBSCRIBE_PATH) {
        base.to_owned()
    } else {
        format!("{}{SUBSCRIBE_PATH}", base.trim_end_matches('/'))
    }
}

impl GapProxy {
    /// Starts a [`TestRelay`] (empty) and subscribes to `upstream` (`ws://host:port`, with or
    /// without the subscribeRepos path) from `cursor` (`Some(0)`: the upstream's whole log, so
    /// the relay can serve any cursor; `None`: a live tail). The subscription is connected when
    /// this returns. If it ends, it is re-opened from the last upstream seq handled (or
    /// `cursor`), so no frame is handled twice.
    ///
    /// The relay answers a cursor above the highest seq it holds with `FutureCursor`: before a
    /// client asks for cursor N, wait for [`GapProxy::wait_for_upstream_seq`]`(N)`.
    pub async fn start(upstream: &str, cursor: Option<i64>) -> io::Result<GapProxy> {
        let relay = TestRelay::start(Vec::new()).await?;
        let (handled_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rules: Vec::new(),
                report: Vec::new(),
                upstream_seq: None,
                last_upstream_error: None,
            }),
            handled_tx,
            upstream_connections: AtomicUsize::new(0),
        });
        let url = subscribe_url(upstream);
        let first = connect(&url, cursor).await?;
        shared.upstream_connections.fetch_add(1, Ordering::SeqCst);
        let push = relay.pusher();
        let task = tokio::spawn(upstream_loop(url, cursor, first, shared.clone(), push));
        Ok(GapProxy {
            relay: Some(relay),
            shared,
            task: Some(task),
        })
    }

    /// The relay the writer connects to: `ws://127.0.0.1:PORT/xrpc/com.atproto.sync.subscribeRepos`.
    pub fn url(&self) -> String {
        self.relay().url()
    }

    /// `ws://127.0.0.1:PORT`: the writer's `--relay` form (it appends the XRPC path).
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.relay().addr())
    }

    /// The relay itself (faults, cursors, connection counts).
    pub fn relay(&self) -> &TestRelay {
        self.relay.as_ref().expect("the proxy is running")
    }

    /// Adds a rule (tried after the rules added before it).
    pub fn add_rule(&self, rule: Rule) {
        self.shared.lock().rules.push(rule);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Rules that can still match (not used up), by name.
    pub fn pending_rules(&self) -> Vec<String> {
        self.shared
            .lock()
            .rules
            .iter()
            .filter(|r| r.live())
            .map(|r| r.name.clone())
            .collect()
    }

    /// Pushes `frame` to the relay now, after everything forwarded so far (e.g. an
    /// `#info OutdatedCursor` notice, or a frame whose seq the test knows to be free).
    pub fn inject(&self, frame: Vec<u8>) {
        let info = FrameInfo::of(&frame);
        // Under the lock, so the report's order is the relay's order.
        let mut state = self.shared.lock();
        self.relay().push(frame);
        state.report.push(Handled {
            info,
            fate: Fate::Injected,
        });
    }

    /// Every frame handled so far, in order, with its fate.
    pub fn report(&self) -> Vec<Handled> {
        self.shared.lock().report.clone()
    }

    /// The upstream frames dropped (not replaced) so far.
    pub fn dropped(&self) -> Vec<FrameInfo> {
        self.report()
            .into_iter()
            .filter(|h| matches!(h.fate, Fate::Dropped { .. }))
            .map(|h| h.info)
            .collect()
    }

    /// The upstream frames replaced so far.
    pub fn replaced(&self) -> Vec<Handled> {
        self.report()
            .into_iter()
            .filter(|h| matches!(h.fate, Fate::Replaced { .. }))
            .collect()
    }

    /// The seqs of the frames the relay serves, in order (forwarded, replacements, injected).
    pub fn served_seqs(&self) -> Vec<Option<i64>> {
        let mut out = Vec::new();
        for h in self.report() {
            match h.fate {
                Fate::Forwarded | Fate::Injected => out.push(h.info.seq),
                Fate::Replaced { with, .. } => out.extend(with.iter().map(|f| f.seq)),
                Fate::Dropped { .. } => {}
            }
        }
        out
    }

    /// The highest upstream seq handled so far.
    pub fn upstream_seq(&self) -> Option<i64> {
        self.shared.lock().upstream_seq
    }

    /// Upstream subscriptions opened so far (1 unless the upstream dropped the connection).
    pub fn upstream_connections(&self) -> usize {
        self.shared.upstream_connections.load(Ordering::SeqCst)
    }

    /// Why the upstream subscription ended last, if it did.
    pub fn last_upstream_error(&self) -> Option<String> {
        self.shared.lock().last_upstream_error.clone()
    }

    /// Waits until the upstream frame with seq `seq` (or a later one) was handled: then the
    /// relay serves everything up to it (minus what rules dropped). False on timeout.
    pub async fn wait_for_upstream_seq(&self, seq: i64, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.upstream_seq.is_some_and(|u| u >= seq))
            .await
    }

    /// Waits until `cond` holds over the report; false on timeout.
    pub async fn wait_for_report(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[Handled]) -> bool,
    ) -> bool {
        self.wait(timeout, |s| cond(&s.report)).await
    }

    async fn wait(&self, timeout: Duration, mut cond: impl FnMut(&State) -> bool) -> bool {
        let mut rx = self.shared.handled_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if cond(&self.shared.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return cond(&self.shared.lock());
            }
        }
    }

    /// Stops the subscription and the relay, waiting for the relay's connections to close.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
    }
}

impl Drop for GapProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, cursor: Option<i64>) -> io::Result<Upstream> {
    let url = match cursor {
        Some(c) => format!("{url}?cursor={c}"),
        None => url.to_owned(),
    };
    let (ws, _) = connect_async(url.as_str())
        .await
        .map_err(|e| io::Error::other(format!("subscribe to {url}: {e}")))?;
    Ok(ws)
}

async fn upstream_loop(
    url: String,
    cursor: Option<i64>,
    first: Upstream,
    shared: Arc<Shared>,
    push: crate::relay::Pusher,
) {
    let mut ws = Some(first);
    loop {
        let mut conn = match ws.take() {
            Some(ws) => ws,
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let resume = shared.lock().upstream_seq.or(cursor);
                match connect(&url, resume).await {
                    Ok(ws) => {
                        shared.upstream_connections.fetch_add(1, Ordering::SeqCst);
                        ws
                    }
                    Err(e) => {
                        shared.lock().last_upstream_error = Some(e.to_string());
                        continue;
                    }
                }
            }
        };
        let why = loop {
            match conn.next().await {
                Some(Ok(Message::Binary(bytes))) => handle(&shared, &push, bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => break format!("closed: {frame:?}"),
                Some(Ok(_)) => {} // pings are answered by tungstenite; text is not a frame
                Some(Err(e)) => break format!("error: {e}"),
                None => break "ended".to_owned(),
            }
        };
        shared.lock().last_upstream_error = Some(why);
    }
}

/// Applies the rules to one upstream frame and forwards what they leave.
fn handle(shared: &Shared, push: &crate::relay::Pusher, frame: Vec<u8>) {
    let info = FrameInfo::of(&frame);
    let mut state = shared.lock();
    let mut fate = Fate::Forwarded;
    let mut out = vec![frame];
    for rule in state.rules.iter_mut() {
        if !rule.live() || !(rule.matcher)(&info) {
            continue;
        }
        if let Some(t) = rule.times.as_mut() {
            *t -= 1;
        }
        match &mut rule.action {
            Action::Drop => {
                fate = Fate::Dropped {
                    rule: rule.name.clone(),
                };
                out.clear();
            }
            Action::Replace(make) => {
                let with = make(&info, &out[0]);
                fate = Fate::Replaced {
                    rule: rule.name.clone(),
                    with: with.iter().map(|f| FrameInfo::of(f)).collect(),
                };
                out = with;
            }
        }
        break;
    }
    for f in out {
        push.push(f);
    }
    if info.seq.is_some() {
        state.upstream_seq = info.seq.max(state.upstream_seq);
    }
    state.report.push(Handled { info, fate });
    drop(state);
    shared.handled_tx.send_modify(|n| *n += 1);
}

/// The current time as the firehose writes it (`2026-01-02T03:04:05.678Z`).
pub fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A well-formed, signed `#commit` of `did` at `seq` creating one post (`text`), signed by
/// [`FORGER_SECRET`] instead of the account's key: a verifier must refuse it as
/// `bad_signature`. Its rev is a TID of now (newer than the account's earlier commits) and its
/// `since`/`prevData` describe the forger's own empty repo.
pub fn forge_commit(did: &str, seq: i64, text: &str) -> Vec<u8> {
    let mut repo = SynthRepo::new(did, FORGER_SECRET);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let time = now_rfc3339();
    let rkey = sync_core::ids::Tid::from_u64((now.as_micros() as u64) << 10);
    repo.commit(
        seq,
        now.as_micros() as u64,
        &time,
        &[OpSpec::create(
            "app.bsky.feed.post",
            rkey.as_str(),
            serde_json::json!({
                "$type": "app.bsky.feed.post",
                "text": text,
                "createdAt": time,
            }),
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_767_225_599, 999), "2025-12-31T23:59:59.999Z");
    }

    #[test]
    fn forged_commit_is_a_commit_of_the_did() {
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let info = FrameInfo::of(&forge_commit(did, 17, "x"));
        assert_eq!(info.seq, Some(17));
        assert!(info.is_commit_of(did), "{info:?}");
        assert_eq!(info.ops.len(), 1);
        assert!(info.ops[0].starts_with("create app.bsky.feed.post/"));
    }
}
