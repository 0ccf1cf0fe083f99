//! An in-memory Bluesky relay for integration tests: a real WebSocket server on 127.0.0.1 that
//! speaks `com.atproto.sync.subscribeRepos` (cursor replay, live tail, `FutureCursor` errors,
//! `OutdatedCursor` notices) and can misbehave on demand ([`Fault`]).
//!
//! ```no_run
//! # async fn demo(frames: Vec<Vec<u8>>) -> std::io::Result<()> {
//! use workspace_tests::relay::{Fault, TestRelay};
//! let relay = TestRelay::start(frames).await?;
//! relay.set_fault(Fault::DropAfter(10));
//! let url = format!("{}?cursor=0", relay.url());
//! // ... run the writer against `url` ...
//! assert_eq!(relay.connections(), 2);
//! relay.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Frames are served as single binary WebSocket messages, exactly as given (unless
//! [`Fault::Fragment`] is set). The relay reads each frame's `seq` with
//! [`sync_core::frame::decode_frame`]; frames without one (`#info`, undecodable bytes) are
//! served in position.
//!
//! Cursor semantics, as the real relay: no `cursor` is a live tail (only frames pushed after
//! connecting); `cursor=N` replays every frame after the last one with seq <= N, then live
//! frames; N above the highest known seq gets an error frame `FutureCursor` and a close (when
//! the log has no seq at all, no cursor is in the future); with a window, N below
//! `oldest seq - window` gets `#info OutdatedCursor` and then everything from the oldest frame.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// The XRPC path the relay serves; every other path is answered with HTTP 404.
pub const SUBSCRIBE_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";

/// Seed of the deterministic garbage generator used by [`Fault::GarbageAfter`].
pub const GARBAGE_SEED: u64 = 0x5eed_f12e_4053_0001;

/// Largest HTTP request head accepted before the upgrade.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a new connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A way for the relay to misbehave. Set with [`TestRelay::set_fault`].
///
/// "After n frames" counts the frames of the relay's log sent on that connection (replayed or
/// live); the `#info OutdatedCursor` notice is not counted. Faults of different kinds combine
/// (e.g. `Delay` with `DropAfter`); setting a one-shot fault replaces a pending one-shot fault,
/// and `Fault::None` clears everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Clear all faults (pending one-shot faults, `Fragment`, `Delay`, `RefuseNext` and
    /// `IgnoreCursor`).
    None,
    /// Close the TCP connection abruptly (no close frame) after sending n frames, once.
    DropAfter(usize),
    /// Stop sending (but keep the socket open, answer nothing, no pongs) after n frames, once;
    /// the next connection behaves normally. The stalled socket is held until the peer's TCP
    /// connection is gone or the relay shuts down.
    StallAfter(usize),
    /// After n frames send m garbage binary messages (random bytes from [`GARBAGE_SEED`], 1 to
    /// 512 bytes each, none of which decodes as a frame), then continue normally, once.
    GarbageAfter(usize, usize),
    /// After n frames (first field) send one binary message of this many bytes (second field;
    /// pick > 5 MB to exceed the firehose limit), then continue, once.
    OversizedAfter(usize, usize),
    /// Answer the next connection with an error frame `{error, message}` and close (with a close
    /// frame), once; e.g. `ErrorFrame("ConsumerTooSlow".into())`.
    ErrorFrame(String),
    /// After n frames send an error frame `{error, message}` and close (with a close frame),
    /// once; e.g. a relay dropping a consumer as too slow in the middle of a stream.
    ErrorFrameAfter(usize, String),
    /// Send each message split into this many WebSocket frames (a binary frame, then
    /// continuation frames; a message shorter than that is split into 1-byte frames), for all
    /// connections until reset. 0 and 1 mean no split.
    Fragment(usize),
    /// Refuse the next n connection attempts: their request head is read (so [`TestRelay::cursors`]
    /// records them), then the TCP connection is closed without any response.
    RefuseNext(usize),
    /// Sleep this long before each message, for all connections until reset (a slow relay).
    Delay(Duration),
    /// Serve every request that has a cursor from the start of the log, never answering
    /// `FutureCursor`: a relay whose sequence was reset, or another relay, that does not honour
    /// the cursor. Requests without a cursor stay live tails. For all connections until reset.
    IgnoreCursor,
}

/// Options of [`TestRelay::start_with_config`].
#[derive(Debug, Clone, Default)]
pub struct RelayConfig {
    /// Replay window: a cursor older than `oldest seq - window` gets `#info OutdatedCursor` and
    /// then everything from the oldest frame. `None` keeps everything (no cursor is outdated).
    pub window: Option<i64>,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Address to listen on; `None` is 127.0.0.1.
    pub host: Option<std::net::IpAddr>,
}

/// One frame of the relay's log.
struct Entry {
    seq: Option<i64>,
    bytes: Bytes,
}

#[derive(Default)]
struct Faults {
    /// Pending one-shot fault (DropAfter, StallAfter, GarbageAfter, OversizedAfter, ErrorFrame,
    /// ErrorFrameAfter).
    once: Option<Fault>,
    refuse: usize,
    fragment: usize,
    delay: Option<Duration>,
    ignore_cursor: bool,
}

struct State {
    log: Vec<Entry>,
    faults: Faults,
    cursors: Vec<Option<i64>>,
}

struct Shared {
    state: Mutex<State>,
    /// Length of the log; bumped on every push so live subscribers wake up.
    len_tx: watch::Sender<usize>,
    window: Option<i64>,
    connections: AtomicUsize,
    /// WebSocket pings received from clients on subscriptions (keepalive checks).
    pings: Arc<AtomicUsize>,
    /// Subscriptions whose start point is fixed (error-frame answers not counted).
    subscriptions: AtomicUsize,
    frames_sent: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection task must not take the whole relay down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, frame: Vec<u8>) {
        let len = {
            let mut state = self.lock();
            state.log.push(Entry {
                seq: frame_seq(&frame),
                bytes: Bytes::from(frame),
            });
            state.log.len()
        };
        self.len_tx.send_replace(len);
    }
}

/// Appends frames to a [`TestRelay`]'s log ([`TestRelay::pusher`]); pushing after the relay
/// stopped does nothing visible.
#[derive(Clone)]
pub struct Pusher {
    shared: Arc<Shared>,
}

impl Pusher {
    /// Same as [`TestRelay::push`].
    pub fn push(&self, frame: Vec<u8>) {
        self.shared.push(frame);
    }
}

/// A running in-memory relay. Dropping it stops the server (without waiting);
/// [`TestRelay::shutdown`] stops it and waits for every connection to be closed.
pub struct TestRelay {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Reads the frames of a capture file (`[u32 LE len][frame]...`).
pub fn load_capture(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path)?;
    sync_core::frame::capture_frames(&data)
        .map(|f| {
            f.map(<[u8]>::to_vec)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .collect()
}

/// The `seq` of a frame, if it decodes and has one.
pub fn frame_seq(frame: &[u8]) -> Option<i64> {
    sync_core::frame::decode_frame(frame)
        .ok()
        .and_then(|e| e.seq())
        .map(|s| s.0)
}

impl TestRelay {
    /// Starts a relay on 127.0.0.1 (random port) serving `frames` (in seq order) with no
    /// replay window.
    pub async fn start(frames: Vec<Vec<u8>>) -> io::Result<TestRelay> {
        Self::start_with_config(frames, RelayConfig::default()).await
    }

    /// Starts a relay whose cursors older than `oldest seq - window` are outdated.
    pub async fn start_with_window(
        frames: Vec<Vec<u8>>,
        window: Option<i64>,
    ) -> io::Result<TestRelay> {
        Self::start_with_config(
            frames,
            RelayConfig {
                window,
                ..RelayConfig::default()
            },
        )
        .await
    }

    /// Starts a relay with explicit options.
    pub async fn start_with_config(
        frames: Vec<Vec<u8>>,
        config: RelayConfig,
    ) -> io::Result<TestRelay> {
        let host = config
            .host
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let listener = TcpListener::bind((host, config.port)).await?;
        let addr = listener.local_addr()?;
        let log: Vec<Entry> = frames
            .into_iter()
            .map(|bytes| Entry {
                seq: frame_seq(&bytes),
                bytes: Bytes::from(bytes),
            })
            .collect();
        let (len_tx, _) = watch::channel(log.len());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                log,
                faults: Faults::default(),
                cursors: Vec::new(),
            }),
            len_tx,
            window: config.window,
            connections: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            pings: Arc::new(AtomicUsize::new(0)),
            frames_sent: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(TestRelay {
            shared,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// `ws://127.0.0.1:PORT/xrpc/com.atproto.sync.subscribeRepos` (no query; an IPv6 address is
    /// bracketed).
    pub fn url(&self) -> String {
        format!("ws://{}{SUBSCRIBE_PATH}", self.addr)
    }

    /// [`TestRelay::url`] with `?cursor=N`.
    pub fn url_with_cursor(&self, cursor: i64) -> String {
        format!("{}?cursor={cursor}", self.url())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Appends a live frame: delivered to connected subscribers and to later cursors.
    pub fn push(&self, frame: Vec<u8>) {
        self.shared.push(frame);
    }

    /// A handle that appends frames like [`TestRelay::push`] from another task (e.g. a proxy
    /// feeding the relay from an upstream subscription).
    pub fn pusher(&self) -> Pusher {
        Pusher {
            shared: self.shared.clone(),
        }
    }

    /// Sets a fault; see [`Fault`] for which connections each variant applies to.
    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.shared.lock();
        let faults = &mut state.faults;
        match fault {
            Fault::None => *faults = Faults::default(),
            Fault::Fragment(n) => faults.fragment = n,
            Fault::RefuseNext(n) => faults.refuse = n,
            Fault::Delay(d) => faults.delay = Some(d).filter(|d| !d.is_zero()),
            Fault::IgnoreCursor => faults.ignore_cursor = true,
            once => faults.once = Some(once),
        }
    }

    /// TCP connections accepted so far (refused and 404 ones included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The cursor each subscribeRepos request asked for, in order (refused ones included;
    /// requests for other paths or with an unparsable cursor are not listed).
    pub fn cursors(&self) -> Vec<Option<i64>> {
        self.shared.lock().cursors.clone()
    }

    /// Frames of the log delivered so far, over all connections (injected info, error, garbage
    /// and oversized messages are not counted).
    pub fn frames_sent(&self) -> usize {
        self.shared.frames_sent.load(Ordering::SeqCst)
    }

    /// The highest seq in the log.
    pub fn last_seq(&self) -> Option<i64> {
        self.shared.lock().log.iter().filter_map(|e| e.seq).max()
    }

    /// Waits until at least `n` connections were accepted; false on timeout.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.connections() >= n).await
    }

    /// Subscriptions accepted so far whose start point is fixed: a frame pushed after this
    /// count went up reaches them, even on a live tail.
    pub fn subscriptions(&self) -> usize {
        self.shared.subscriptions.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` subscriptions have a fixed start point; false on timeout.
    /// Use this, not [`TestRelay::wait_for_connections`], before pushing a frame a live tail
    /// must receive: a connection is counted before its start point is decided.
    pub async fn wait_for_subscriptions(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.subscriptions() >= n).await
    }

    /// WebSocket pings received from clients on subscriptions so far.
    pub fn pings_received(&self) -> usize {
        self.shared.pings.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` frames were sent; false on timeout.
    pub async fn wait_for_frames_sent(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.frames_sent() >= n).await
    }

    async fn wait_until(&self, timeout: Duration, cond: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting, closes every connection and waits until they are gone.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Aborting drops the JoinSet of connections, which aborts them too.
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // e.g. EMFILE: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_connection(stream, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// A parsed upgrade request.
struct Request {
    path: String,
    query: String,
    method: String,
    key: Option<String>,
    upgrade_websocket: bool,
}

fn parse_request(head: &[u8]) -> Option<Request> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut key = None;
    let mut upgrade_websocket = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket = value.eq_ignore_ascii_case("websocket");
        }
    }
    Some(Request {
        path: path.to_owned(),
        query: query.to_owned(),
        method,
        key,
        upgrade_websocket,
    })
}

/// `Ok(None)`: no cursor; `Err(())`: unparsable.
fn parse_cursor(query: &str) -> Result<Option<i64>, ()> {
    let mut cursor = None;
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("cursor=") {
            cursor = Some(value.parse::<i64>().map_err(|_| ())?);
        }
    }
    Ok(cursor)
}

/// Reads the HTTP request head; returns it and any bytes read past it.
async fn read_head(stream: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched_from + pos + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

async fn http_error(mut stream: TcpStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let Ok(Ok((head, rest))) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await
    else {
        return;
    };
    let Some(request) = parse_request(&head) else {
        return http_error(stream, "400 Bad Request", "bad request").await;
    };
    if request.path != SUBSCRIBE_PATH {
        return http_error(stream, "404 Not Found", "not found").await;
    }
    let Ok(cursor) = parse_cursor(&request.query) else {
        return http_error(stream, "400 Bad Request", "invalid cursor").await;
    };
    let refused = {
        let mut state = shared.lock();
        state.cursors.push(cursor);
        if state.faults.refuse > 0 {
            state.faults.refuse -= 1;
            true
        } else {
            false
        }
    };
    if refused {
        // Closing without a response: the client's handshake fails.
        return;
    }
    let Some(key) = request.key.filter(|_| request.upgrade_websocket) else {
        return http_error(stream, "400 Bad Request", "expected a WebSocket upgrade").await;
    };
    if request.method != "GET" {
        return http_error(stream, "405 Method Not Allowed", "method not allowed").await;
    }
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let ws = WebSocketStream::from_partially_read(
        stream,
        rest,
        Role::Server,
        Some(WebSocketConfig::default()),
    )
    .await;
    let _ = stream_events(ws, cursor, &shared).await;
}

/// Where a subscription starts, decided under the state lock.
enum Start {
    Error(Vec<u8>),
    From {
        index: usize,
        notice: Option<Vec<u8>>,
        fault: Option<Fault>,
    },
}

fn resolve_start(state: &mut State, cursor: Option<i64>, window: Option<i64>) -> Start {
    if let Some(Fault::ErrorFrame(error)) = &state.faults.once {
        let frame = sync_core::synth::error_frame(error, Some("Injected by the test relay."));
        state.faults.once = None;
        return Start::Error(frame);
    }
    let (index, notice) = match cursor {
        None => (state.log.len(), None),
        Some(_) if state.faults.ignore_cursor => (0, None),
        Some(n) => {
            let seqs = || state.log.iter().filter_map(|e| e.seq);
            let highest = seqs().max();
            let oldest = seqs().min();
            if highest.is_some_and(|h| n > h) {
                return Start::Error(sync_core::synth::error_frame(
                    "FutureCursor",
                    Some("Cursor in the future."),
                ));
            }
            let outdated = match (window, oldest) {
                (Some(w), Some(o)) => n < o.saturating_sub(w),
                _ => false,
            };
            if outdated {
                let notice = sync_core::synth::info_frame(
                    "OutdatedCursor",
                    Some("Requested cursor exceeded limit. Possibly missing events"),
                );
                (0, Some(notice))
            } else {
                // Right after the last frame with seq <= n: later seq-less frames are sent in
                // position.
                let index = state
                    .log
                    .iter()
                    .rposition(|e| e.seq.is_some_and(|s| s <= n))
                    .map_or(0, |i| i + 1);
                (index, None)
            }
        }
    };
    Start::From {
        index,
        notice,
        fault: state.faults.once.take(),
    }
}

/// Deterministic stream of garbage messages.
struct Garbage(sync_core::synth::SplitMix64);

impl Garbage {
    fn new(seed: u64) -> Garbage {
        Garbage(sync_core::synth::SplitMix64(seed))
    }

    fn message(&mut self) -> Vec<u8> {
        loop {
            let len = 1 + self.0.below(512) as usize;
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                out.extend_from_slice(&self.0.next_u64().to_le_bytes());
            }
            out.truncate(len);
            // Garbage must stay garbage, whatever the seed.
            if sync_core::frame::decode_frame(&out).is_err() {
                return out;
            }
        }
    }
}

/// Deterministic garbage messages as sent by [`Fault::GarbageAfter`] (for assertions).
pub fn garbage_messages(count: usize) -> Vec<Vec<u8>> {
    let mut gen = Garbage::new(GARBAGE_SEED);
    (0..count).map(|_| gen.message()).collect()
}

type Sink = futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>;
type WsResult<T> = Result<T, tokio_tungstenite::tungstenite::Error>;

/// Sends one message, honouring the `Delay` and `Fragment` faults in force.
async fn send(sink: &mut Sink, shared: &Shared, bytes: Bytes) -> WsResult<()> {
    let (delay, pieces) = {
        let state = shared.lock();
        (state.faults.delay, state.faults.fragment)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if pieces < 2 || bytes.len() < 2 {
        return sink.send(Message::Binary(bytes)).await;
    }
    let size = bytes.len().div_ceil(pieces.min(bytes.len()));
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + size).min(bytes.len());
        let opcode = if start == 0 {
            Data::Binary
        } else {
            Data::Continue
        };
        let frame = Frame::message(
            bytes.slice(start..end),
            OpCode::Data(opcode),
            end == bytes.len(),
        );
        start = end;
        sink.feed(Message::Frame(frame)).await?;
    }
    sink.flush().await
}

async fn stream_events(
    ws: WebSocketStream<TcpStream>,
    cursor: Option<i64>,
    shared: &Shared,
) -> WsResult<()> {
    let (mut sink, mut incoming) = ws.split();
    let start = {
        let mut state = shared.lock();
        let start = resolve_start(&mut state, cursor, shared.window);
        if matches!(start, Start::From { .. }) {
            // Counted under the lock, so a push that sees the count is after the start point.
            shared.subscriptions.fetch_add(1, Ordering::SeqCst);
        }
        start
    };
    let (index, notice, fault) = match start {
        Start::Error(frame) => {
            send(&mut sink, shared, frame.into()).await?;
            sink.close().await?;
            // Wait (briefly) for the peer's close reply so the socket closes cleanly.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = incoming.next().await {}
            })
            .await;
            return Ok(());
        }
        Start::From {
            index,
            notice,
            fault,
        } => (index, notice, fault),
    };
    let mut len_rx = shared.len_tx.subscribe();
    // Reads (and so answers pings and close frames) until the peer goes away, or hands the
    // read half back when told to stop.
    let (gone_tx, mut gone_rx) = oneshot::channel::<()>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let pings = shared.pings.clone();
    let reader = tokio::spawn(async move {
        tokio::select! {
            _ = async {
                while let Some(Ok(message)) = incoming.next().await {
                    if message.is_ping() {
                        pings.fetch_add(1, Ordering::SeqCst);
                    }
                }
            } => {
                let _ = gone_tx.send(());
                None
            }
            _ = stop_rx => Some(incoming),
        }
    });
    let result = serve_log(
        &mut sink,
        shared,
        index,
        notice,
        fault,
        &mut len_rx,
        &mut gone_rx,
    )
    .await;
    match result {
        Ok(Outcome::Stall) | Ok(Outcome::Drop) => {
            let stall = matches!(result, Ok(Outcome::Stall));
            let _ = stop_tx.send(());
            let Ok(Some(incoming)) = reader.await else {
                return Ok(());
            };
            let Ok(ws) = sink.reunite(incoming) else {
                return Ok(());
            };
            // Unflushed tungstenite output (e.g. a queued pong) is discarded with the wrapper.
            let tcp = ws.into_inner();
            if stall {
                hold_until_peer_gone(tcp).await;
            }
            // Dropping the socket closes it without a close frame.
        }
        Ok(Outcome::PeerGone) | Err(_) => {
            // Let the reader finish the closing handshake, if any.
            let mut reader = reader;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut reader).await;
            reader.abort();
            drop(stop_tx);
        }
    }
    Ok(())
}

enum Outcome {
    PeerGone,
    Drop,
    Stall,
}

/// Holds a stalled socket, answering nothing: incoming bytes are read and discarded at the TCP
/// level (never parsed, so no pong is sent) until the peer closes or resets the connection.
async fn hold_until_peer_gone(mut tcp: TcpStream) {
    let mut discard = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut discard).await {
        if n == 0 {
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_log(
    sink: &mut Sink,
    shared: &Shared,
    mut index: usize,
    notice: Option<Vec<u8>>,
    mut fault: Option<Fault>,
    len_rx: &mut watch::Receiver<usize>,
    gone_rx: &mut oneshot::Receiver<()>,
) -> WsResult<Outcome> {
    if let Some(notice) = notice {
        send(sink, shared, notice.into()).await?;
    }
    let mut sent = 0usize;
    loop {
        match &fault {
            Some(Fault::DropAfter(n)) if sent == *n => return Ok(Outcome::Drop),
            Some(Fault::StallAfter(n)) if sent == *n => return Ok(Outcome::Stall),
            Some(Fault::GarbageAfter(n, m)) if sent == *n => {
                let mut gen = Garbage::new(GARBAGE_SEED);
                for _ in 0..*m {
                    send(sink, shared, gen.message().into()).await?;
                }
                fault = None;
            }
            Some(Fault::ErrorFrameAfter(n, error)) if sent == *n => {
                let frame =
                    sync_core::synth::error_frame(error, Some("Injected by the test relay."));
                send(sink, shared, frame.into()).await?;
                sink.close().await?;
                return Ok(Outcome::PeerGone);
            }
            Some(Fault::OversizedAfter(n, size)) if sent == *n => {
                let big: Vec<u8> = (0..*size).map(|i| (i % 251) as u8).collect();
                send(sink, shared, big.into()).await?;
                fault = None;
            }
            _ => {}
        }
        let frame = loop {
            len_rx.borrow_and_update();
            if let Some(entry) = shared.lock().log.get(index) {
                break entry.bytes.clone();
            }
            tokio::select! {
                changed = len_rx.changed() => {
                    if changed.is_err() {
                        return Ok(Outcome::PeerGone);
                    }
                }
                _ = &mut *gone_rx => return Ok(Outcome::PeerGone),
            }
        };
        tokio::select! {
            biased;
            _ = &mut *gone_rx => return Ok(Outcome::PeerGone),
            r = send(sink, shared, frame) => r?,
        }
        index += 1;
        sent += 1;
        shared.frames_sent.fetch_add(1, Ordering::SeqCst);
    }
}
