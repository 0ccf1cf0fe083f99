//! Frame sources: the relay WebSocket (reconnects, backoff, keepalive, stall watchdog, error
//! frames) and capture-file replay. Both feed the processor's bounded channel.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use sync_core::frame::{decode_frame, frame_seq, is_error_frame, Event, MAX_FRAME_BYTES};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, UrlError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{error, info, warn};

use crate::config::FutureCursorPolicy;
use crate::metrics::Metrics;
use crate::processor::Input;

/// Messages larger than this make tungstenite fail the connection; larger than
/// [`MAX_FRAME_BYTES`] but below it are received, dropped and counted.
pub const WS_MAX_MESSAGE: usize = 64 << 20;
/// Keepalive pings: every 20 s, or more often when the stall timeout is short, so at least one
/// pong can answer within every stall timeout: a pong proves a quiet upstream is alive.
const PING_EVERY: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Sending our close frame waits for socket buffer space, which a peer that stopped reading
/// never frees: stopping must not hang on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Connections in a row that fail on an over-limit message at the same resume point before the
/// writer gives up: the message is met again on every reconnect, so retrying cannot help.
pub const TOO_LARGE_ATTEMPTS: u32 = 3;

/// Most frames, and bytes, handed to the processor in one channel message.
pub const BATCH_FRAMES: usize = 64;
pub const BATCH_BYTES: usize = 512 * 1024;

/// Frames received and not yet handed to the processor.
#[derive(Default)]
struct Batch {
    frames: Vec<Bytes>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push(frame);
    }
    fn is_full(&self) -> bool {
        self.frames.len() >= BATCH_FRAMES || self.bytes >= BATCH_BYTES
    }
    fn take(&mut self) -> Input {
        self.bytes = 0;
        Input::Frames(std::mem::take(&mut self.frames))
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base * 2^attempt)].
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(max);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs().rotate_left(17))
        .unwrap_or(0);
    // xorshift of the clock: jitter needs spread, not cryptographic quality
    let mut x = nanos | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let frac = (x % 10_000) as f64 / 10_000.0;
    cap.mul_f64(frac)
}

/// The identity of an upstream, stored next to the cursor: the lowercase `host[:port]` of its URL
/// without scheme, credentials, path or default port (`wss://bsky.network/xrpc/...` ->
/// `bsky.network`). A seq means something only to the upstream that assigned it.
pub fn upstream_id(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let authority = authority.to_ascii_lowercase();
    // IPv6 literals keep their brackets; a port is what follows the host.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, tail)) => (format!("[{addr}]"), tail.strip_prefix(':')),
            None => (authority.clone(), None),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.clone(), None),
        },
    };
    let host = host.trim_end_matches('.');
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "wss" | "https" => Some("443"),
        "ws" | "http" => Some("80"),
        _ => None,
    };
    match port.filter(|p| !p.is_empty() && Some(*p) != default_port) {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

pub struct RelaySource {
    pub url: String,
    /// Where the first connect resumes (after this seq); `None` tails live.
    pub start_cursor: Option<i64>,
    pub stall_timeout: Duration,
    pub max_backoff: Duration,
    pub on_future_cursor: FutureCursorPolicy,
    pub metrics: Arc<Metrics>,
    /// The processor's committed cursor (-1 before the first commit). Read only when the relay
    /// drops us as too slow: what was handed over but not yet durable may be lost then.
    pub durable_cursor: Arc<AtomicI64>,
    /// Largest WebSocket message accepted: [`WS_MAX_MESSAGE`], smaller in tests.
    pub max_message_bytes: usize,
}

/// How the next connect resumes, as decided when a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// After the last frame handed to the processor.
    AfterLast,
    /// From the committed cursor (the relay dropped us as too slow).
    Durable,
    /// Without a cursor: a live tail of a new seq stream.
    Live,
}

/// Where the next connect resumes: the one place the source keeps it (ARCHITECTURE.md).
///
/// Every frame handed to the processor is handled in order, so resuming after the last one handed
/// over neither skips nor fetches anything twice, whether or not the processor got to it yet.
#[derive(Debug)]
struct ResumePoint {
    /// The cursor of the next connect; `None` tails live.
    cursor: Option<i64>,
    /// The cursor the current seq stream started from (for a live tail: just before its first
    /// seq). The durable cursor is never below it, except while the processor has not yet seen
    /// the switch to a new stream: then the old stream's value must not be used.
    floor: Option<i64>,
    /// The stream switched to a live tail: the processor must forget the old stream's seqs.
    reset_pending: bool,
}

impl ResumePoint {
    fn new(start: Option<i64>) -> Self {
        ResumePoint {
            cursor: start,
            floor: start,
            reset_pending: false,
        }
    }

    /// Frames are being handed to the processor: the resume point moves past them.
    fn handed_over(&mut self, frames: &[Bytes]) {
        // The last frame almost always has a seq: one header-and-seq parse per batch.
        let Some(last) = frames.iter().rev().find_map(|f| frame_seq(f)) else {
            return;
        };
        if self.floor.is_none() {
            let first = frames.iter().find_map(|f| frame_seq(f)).unwrap_or(last);
            self.floor = Some(first - 1);
        }
        // A replayed lower seq (skipped by the processor) must not move the resume point back.
        self.cursor = Some(self.cursor.map_or(last, |c| c.max(last)));
    }

    /// A connection ended; `durable` is the processor's committed cursor (-1: none).
    fn after(&mut self, how: Resume, durable: i64) {
        match how {
            Resume::AfterLast => {}
            Resume::Durable => {
                if let (Some(cursor), Some(floor)) = (self.cursor, self.floor) {
                    if durable >= 0 {
                        self.cursor = Some(durable.clamp(floor, cursor));
                    }
                }
            }
            Resume::Live => {
                self.cursor = None;
                self.floor = None;
                self.reset_pending = true;
            }
        }
    }

    /// True once after a switch to a live tail.
    fn take_reset(&mut self) -> bool {
        std::mem::take(&mut self.reset_pending)
    }
}

/// Failures on an over-limit message, counted per resume point.
#[derive(Default)]
struct TooLarge {
    at: Option<Option<i64>>,
    count: u32,
}

impl TooLarge {
    /// Counts a failure at `cursor`; returns the failures in a row there.
    fn failed_at(&mut self, cursor: Option<i64>) -> u32 {
        if self.at == Some(cursor) {
            self.count += 1;
        } else {
            self.at = Some(cursor);
            self.count = 1;
        }
        self.count
    }
}

type Ws = WebSocketStream<MaybeTlsStream<BufReader<TcpStream>>>;

/// Bytes the socket is read in at a time. Over `ws://` the WebSocket codec asks for about one
/// message per read (~5 KB on the firehose), under `wss://` rustls for ~4 KiB; buffered, one
/// `recv` takes whatever has arrived, up to this.
/// Unbuffered, a `recv` per message (each also running TCP's receive and ACK work) was 7 % of
/// the writer's CPU samples at ~50,000 frames/s; buffered, 3 % (BENCHMARKS.md).
const SOCKET_READ_BUFFER: usize = 256 * 1024;

/// TCP connect, then TLS (for `wss://`) and the WebSocket handshake over a read-buffered socket.
/// The same steps as `tokio_tungstenite::connect_async_with_config`, with the buffer between.
async fn open_websocket(url: &str, config: WebSocketConfig) -> Result<Ws, WsError> {
    let request = url.into_client_request()?;
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or(WsError::Url(UrlError::NoHostName))?
        // An IPv6 literal is bracketed in a URL, not in a socket address or a TLS name.
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .or(match uri.scheme_str() {
            Some("wss") => Some(443),
            Some("ws") => Some(80),
            _ => None,
        })
        .ok_or(WsError::Url(UrlError::UnsupportedUrlScheme))?;
    let socket = TcpStream::connect((host.as_str(), port)).await?;
    let stream = BufReader::with_capacity(SOCKET_READ_BUFFER, socket);
    let (ws, _) =
        tokio_tungstenite::client_async_tls_with_config(request, stream, Some(config), None)
            .await?;
    Ok(ws)
}

enum Connected {
    Open(Box<Ws>),
    Failed,
    Shutdown,
}

/// How a connection ended.
enum Ended {
    /// Shutdown requested, or the processor is gone: stop.
    Stop,
    Reconnect(Resume),
    /// A message over the WebSocket size limit: the connection is unusable.
    TooLarge {
        size: usize,
        max_size: usize,
    },
}

impl RelaySource {
    /// Runs until shutdown; returns an error only for conditions an operator must see
    /// ([`crate::NeedsOperator`]: FutureCursor or a seq reset with the `exit` policy, a message
    /// that cannot be received).
    pub async fn run(
        self,
        tx: mpsc::Sender<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut resume = ResumePoint::new(self.start_cursor);
        let mut attempt: u32 = 0;
        let mut too_large = TooLarge::default();
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if !first {
                self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(attempt, self.max_backoff);
                info!(
                    delay_ms = delay.as_millis() as u64,
                    attempt, "reconnecting after backoff"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                attempt = attempt.saturating_add(1);
            }
            first = false;
            let requested = resume.cursor;
            let ws = match self.connect(requested, &mut shutdown).await {
                Connected::Open(ws) => ws,
                Connected::Failed => continue,
                Connected::Shutdown => return Ok(()),
            };
            // A live tail after a switch starts a new seq stream, with lower seqs: the processor
            // must accept them.
            if resume.take_reset() && tx.send(Input::ResetSeq).await.is_err() {
                return Ok(());
            }
            self.metrics.set_connected(true);
            let ended = self
                .pump(
                    *ws,
                    requested,
                    &tx,
                    &mut shutdown,
                    &mut resume,
                    &mut attempt,
                )
                .await;
            self.metrics.set_connected(false);
            match ended? {
                Ended::Stop => return Ok(()),
                Ended::Reconnect(how) => {
                    resume.after(how, self.durable_cursor.load(Ordering::Relaxed))
                }
                Ended::TooLarge { size, max_size } => {
                    let failures = too_large.failed_at(resume.cursor);
                    let seq = resume.cursor;
                    let after = match seq {
                        Some(seq) => format!("seq {seq}"),
                        None => "the start of a live tail".to_owned(),
                    };
                    self.metrics.dropped("frame_too_large");
                    self.metrics.set_source_error(Some(format!(
                        "a {size}-byte message after {after} exceeds the {max_size}-byte WebSocket limit"
                    )));
                    warn!(
                        ?seq,
                        size,
                        limit = max_size,
                        failures,
                        "message over the WebSocket size limit; reconnecting"
                    );
                    if failures >= TOO_LARGE_ATTEMPTS {
                        return Err(anyhow::Error::new(crate::NeedsOperator(format!(
                            "the relay sent a {size}-byte message right after {after}, over the {max_size}-byte WebSocket limit, on {failures} connections in a row: resuming there meets it again every time. Skip it with `firehose-writer set-cursor N` (N the seq of the event after it; that event is not captured), or follow another relay"
                        ))));
                    }
                }
            }
            if tx.is_closed() {
                return Ok(());
            }
        }
    }

    /// Opens the WebSocket (DNS, TCP, TLS, handshake), abandoned at once on shutdown.
    async fn connect(
        &self,
        cursor: Option<i64>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Connected {
        let url = match cursor {
            Some(c) => format!("{}?cursor={c}", self.url),
            None => self.url.clone(),
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes));
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, open_websocket(&url, config));
        let result = tokio::select! {
            result = connect => result,
            _ = shutdown.changed() => return Connected::Shutdown,
        };
        match result {
            Ok(Ok(ws)) => {
                info!(%url, ?cursor, "connected");
                Connected::Open(Box::new(ws))
            }
            Ok(Err(e)) => {
                warn!(%url, error = %e, "connect failed");
                self.metrics
                    .set_source_error(Some(format!("connect {url}: {e}")));
                Connected::Failed
            }
            Err(_) => {
                warn!(%url, "connect timed out");
                self.metrics
                    .set_source_error(Some(format!("connect {url}: timed out")));
                Connected::Failed
            }
        }
    }

    /// Hands the frames of one connection to the processor until the connection ends.
    async fn pump(
        &self,
        mut ws: Ws,
        requested: Option<i64>,
        tx: &mpsc::Sender<Input>,
        shutdown: &mut watch::Receiver<bool>,
        resume: &mut ResumePoint,
        attempt: &mut u32,
    ) -> Result<Ended> {
        let mut ping = tokio::time::interval(
            PING_EVERY
                .min(self.stall_timeout / 2)
                .max(Duration::from_millis(100)),
        );
        ping.tick().await;
        // The stall watchdog measures time since the upstream last showed it is alive: an event
        // (binary message), or a pong answering our ping (a quiet upstream is not a stalled one).
        // Our own pings and the wake-ups of this loop do not count.
        let mut alive = tokio::time::Instant::now();
        let mut first_event = true;
        // The first seq of a connection that asked for a cursor must be above it.
        let mut unchecked = requested;
        // Frames already received are handed over in batches: one channel operation (and at
        // most one processor wake-up) per batch instead of per frame.
        let mut batch = Batch::default();
        let ended: Result<Ended> = loop {
            let ready = if batch.is_full() || batch.frames.is_empty() {
                None
            } else {
                ws.next().now_or_never()
            };
            let next = match ready {
                Some(next) => next,
                None => {
                    if !batch.frames.is_empty() {
                        if !hand_over(&mut batch, tx, resume).await {
                            break Ok(Ended::Stop);
                        }
                        // A full channel (slow disk) may have held us here for long: the
                        // watchdog measures upstream silence, not our own backpressure.
                        alive = tokio::time::Instant::now();
                    }
                    tokio::select! {
                        // Data first: an expired watchdog must not win over a ready message.
                        biased;
                        _ = shutdown.changed() => {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                            break Ok(Ended::Stop);
                        }
                        next = ws.next() => next,
                        _ = ping.tick() => {
                            if let Err(e) = ws.send(Message::Ping(Bytes::new())).await {
                                warn!(error = %e, "ping failed");
                                break Ok(Ended::Reconnect(Resume::AfterLast));
                            }
                            continue;
                        }
                        _ = tokio::time::sleep_until(alive + self.stall_timeout) => {
                            self.metrics.stalls.fetch_add(1, Ordering::Relaxed);
                            warn!(stall_timeout_s = self.stall_timeout.as_secs_f64(), "neither an event nor a pong within the stall timeout; reconnecting");
                            break Ok(Ended::Reconnect(Resume::AfterLast));
                        }
                    }
                }
            };
            let message = match next {
                None => {
                    warn!("relay closed the connection");
                    break Ok(Ended::Reconnect(Resume::AfterLast));
                }
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    break Ok(Ended::TooLarge { size, max_size });
                }
                Some(Err(e)) => {
                    warn!(error = %e, "websocket error");
                    break Ok(Ended::Reconnect(Resume::AfterLast));
                }
                Some(Ok(m)) => m,
            };
            match message {
                Message::Binary(bytes) => {
                    if bytes.len() > MAX_FRAME_BYTES {
                        self.metrics.frame(bytes.len());
                        self.metrics.dropped("frame_too_large");
                        warn!(bytes = bytes.len(), "dropping oversized message");
                        continue;
                    }
                    if is_error_frame(&bytes) {
                        break self
                            .handle_error_frame(&bytes, requested)
                            .map(Ended::Reconnect);
                    }
                    if let Some(cursor) = unchecked {
                        if let Some(seq) = frame_seq(&bytes) {
                            unchecked = None;
                            if seq <= cursor {
                                break self.seq_reset(seq, cursor).map(Ended::Reconnect);
                            }
                        }
                    }
                    if first_event {
                        // Events flow again: a connection problem is over.
                        self.metrics.set_source_error(None);
                        first_event = false;
                    }
                    self.metrics.frame_arrived();
                    batch.push(bytes);
                    alive = tokio::time::Instant::now();
                    *attempt = 0;
                }
                Message::Pong(_) => alive = tokio::time::Instant::now(),
                Message::Text(_) => self.metrics.dropped("text_message"),
                Message::Close(frame) => {
                    info!(?frame, "relay sent close");
                    break Ok(Ended::Reconnect(Resume::AfterLast));
                }
                Message::Ping(_) | Message::Frame(_) => {}
            }
        };
        // Whatever arrived before the connection ended is still handled, in order.
        if !batch.frames.is_empty() {
            hand_over(&mut batch, tx, resume).await;
        }
        ended
    }

    /// The upstream does not continue from our cursor: `FutureCursor`, or a first seq at or
    /// below it. Either stop for an operator or, when allowed, tail live.
    fn cursor_not_honoured(&self, what: String) -> Result<Resume> {
        match self.on_future_cursor {
            FutureCursorPolicy::Live => {
                error!(upstream = %upstream_id(&self.url), "{what}; --on-future-cursor=live: dropping the cursor and tailing live (events between the cursor and now are not captured)");
                Ok(Resume::Live)
            }
            FutureCursorPolicy::Exit => Err(anyhow::Error::new(crate::NeedsOperator(format!(
                "{what}. Check --relay, pass --cursor N (a seq of this relay), or set --on-future-cursor=live to tail live (events between the cursor and now are not captured)"
            )))),
        }
    }

    fn seq_reset(&self, seq: i64, requested: i64) -> Result<Resume> {
        self.metrics.seq_resets.fetch_add(1, Ordering::Relaxed);
        self.metrics.set_source_error(Some(format!(
            "relay answered cursor {requested} with seq {seq}"
        )));
        error!(
            seq,
            cursor = requested,
            "the first seq is at or below the requested cursor"
        );
        self.cursor_not_honoured(format!(
            "relay {} answered cursor {requested} with seq {seq}, at or below it: it does not continue our sequence (its seqs were reset, or it is another relay)",
            upstream_id(&self.url)
        ))
    }

    fn handle_error_frame(&self, bytes: &[u8], cursor: Option<i64>) -> Result<Resume> {
        let (error, message) = match decode_frame(bytes) {
            Ok(Event::Error(e)) => (e.error, e.message),
            _ => ("unreadable error frame".to_owned(), None),
        };
        self.metrics.event("error");
        self.metrics.set_source_error(Some(format!(
            "relay error {error}: {}",
            message.clone().unwrap_or_default()
        )));
        match error.as_str() {
            "FutureCursor" => self.cursor_not_honoured(format!(
                "relay {} answered FutureCursor for cursor {cursor:?} ({}): the cursor is ahead of this relay (a different relay or a reset?)",
                upstream_id(&self.url),
                message.unwrap_or_default()
            )),
            "ConsumerTooSlow" => {
                warn!(?message, "relay dropped us as too slow; reconnecting from the durable cursor");
                Ok(Resume::Durable)
            }
            other => {
                warn!(error = other, ?message, "relay error frame; reconnecting");
                Ok(Resume::AfterLast)
            }
        }
    }
}

/// Hands a batch to the processor, moving the resume point past it; false when the processor
/// is gone.
async fn hand_over(batch: &mut Batch, tx: &mpsc::Sender<Input>, resume: &mut ResumePoint) -> bool {
    resume.handed_over(&batch.frames);
    tx.send(batch.take()).await.is_ok()
}

/// Feeds a capture file (`[u32 LE length][frame]...`) to the processor, then returns.
pub async fn replay(
    path: &Path,
    tx: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening replay file {}", path.display()))?;
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file);
    let mut offset: u64 = 0;
    let mut batch = Batch::default();
    let result: Result<()> = loop {
        if batch.is_full() && tx.send(batch.take()).await.is_err() {
            return Ok(());
        }
        if *shutdown.borrow_and_update() {
            info!(offset, "shutdown requested; replay stops here");
            break Ok(());
        }
        let mut len_bytes = [0u8; 4];
        match reader.read_exact(&mut len_bytes).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > WS_MAX_MESSAGE {
            // Cannot be a frame; skip its bytes so the rest of the capture is still read.
            metrics.frame(len);
            metrics.dropped("frame_too_large");
            warn!(offset, len, "skipping oversized capture record");
            let mut limited = (&mut reader).take(len as u64);
            let skipped = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if skipped < len as u64 {
                metrics.dropped("truncated_capture");
                break Ok(());
            }
            offset += 4 + len as u64;
            continue;
        }
        let mut frame = vec![0u8; len];
        if let Err(e) = reader.read_exact(&mut frame).await {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                metrics.dropped("truncated_capture");
                warn!(
                    offset,
                    "capture ends inside a frame; ignoring the partial frame"
                );
                break Ok(());
            }
            break Err(e).with_context(|| format!("reading {}", path.display()));
        }
        offset += 4 + len as u64;
        metrics.frame_arrived();
        batch.push(Bytes::from(frame));
    };
    if !batch.frames.is_empty() {
        let _ = tx.send(batch.take()).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_are_normalised_hosts() {
        for (url, id) in [
            ("wss://bsky.network", "bsky.network"),
            (
                "wss://BSKY.Network/xrpc/com.atproto.sync.subscribeRepos",
                "bsky.network",
            ),
            ("wss://bsky.network:443/xrpc/x?cursor=1", "bsky.network"),
            ("ws://bsky.network:80", "bsky.network"),
            ("ws://bsky.network.:8080/", "bsky.network:8080"),
            ("wss://bsky.network:80", "bsky.network:80"),
            ("ws://127.0.0.1:2470/xrpc/x", "127.0.0.1:2470"),
            ("ws://user:pw@pds.example.com", "pds.example.com"),
            ("ws://[::1]:2470/xrpc/x", "[::1]:2470"),
            ("wss://[2001:DB8::1]", "[2001:db8::1]"),
        ] {
            assert_eq!(upstream_id(url), id, "{url}");
        }
    }

    fn frame(seq: i64) -> Bytes {
        Bytes::from(sync_core::synth::identity_frame(
            seq,
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            None,
            "2026-07-04T14:38:07.877Z",
        ))
    }

    fn info() -> Bytes {
        Bytes::from(sync_core::synth::info_frame("Note", None))
    }

    #[test]
    fn the_resume_point_follows_the_frames_handed_over() {
        let mut resume = ResumePoint::new(Some(10));
        resume.handed_over(&[frame(11), frame(12), info()]);
        assert_eq!(
            resume.cursor,
            Some(12),
            "a trailing #info keeps the last seq"
        );
        resume.handed_over(&[info()]);
        assert_eq!(resume.cursor, Some(12));
        resume.handed_over(&[frame(9)]);
        assert_eq!(
            resume.cursor,
            Some(12),
            "a replayed lower seq does not move it back"
        );
        resume.after(Resume::AfterLast, 11);
        assert_eq!(resume.cursor, Some(12));
        resume.after(Resume::Durable, 11);
        assert_eq!(resume.cursor, Some(11));
        resume.after(Resume::Durable, -1);
        assert_eq!(resume.cursor, Some(11), "nothing committed: keep the point");
    }

    #[test]
    fn a_switch_to_live_starts_a_new_stream() {
        let mut resume = ResumePoint::new(Some(5000));
        resume.after(Resume::Live, 4990);
        assert_eq!(resume.cursor, None);
        assert!(resume.take_reset());
        assert!(!resume.take_reset());
        resume.after(Resume::Durable, 4990);
        assert_eq!(resume.cursor, None, "still live: nothing received yet");
        resume.handed_over(&[info(), frame(20), frame(21)]);
        assert_eq!(resume.cursor, Some(21));
        // The processor has not seen the switch yet: its durable cursor is the old stream's.
        resume.after(Resume::Durable, 4990);
        assert_eq!(resume.cursor, Some(21));
        resume.after(Resume::Durable, 3);
        assert_eq!(resume.cursor, Some(19), "not below the new stream's start");
    }

    #[test]
    fn over_limit_failures_count_per_resume_point() {
        let mut too_large = TooLarge::default();
        assert_eq!(too_large.failed_at(Some(5)), 1);
        assert_eq!(too_large.failed_at(Some(5)), 2);
        assert_eq!(too_large.failed_at(Some(7)), 1, "progress starts over");
        assert_eq!(too_large.failed_at(Some(7)), 2);
        assert_eq!(too_large.failed_at(None), 1);
    }
}
