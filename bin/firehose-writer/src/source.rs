//! Frame sources: the relay WebSocket (reconnects, backoff, keepalive, stall watchdog, error
//! frames) and capture-file replay. Both feed the processor's bounded channel.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use sync_core::frame::{decode_frame, frame_seq, is_error_frame, Event, MAX_FRAME_BYTES};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tracing::{error, info, warn};

use crate::config::FutureCursorPolicy;
use crate::metrics::Metrics;
use crate::processor::Input;

/// Messages larger than this make tungstenite fail the connection; larger than
/// [`MAX_FRAME_BYTES`] but below it are received, dropped and counted.
const WS_MAX_MESSAGE: usize = 64 << 20;
/// Keepalive pings: every 20 s, or more often when the stall timeout is short, so the socket is
/// exercised well within it. Pongs do not count as events for the stall watchdog.
const PING_EVERY: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(250);

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

pub struct RelaySource {
    pub url: String,
    pub start_cursor: Option<i64>,
    pub stall_timeout: Duration,
    pub max_backoff: Duration,
    pub on_future_cursor: FutureCursorPolicy,
    pub metrics: Arc<Metrics>,
    pub handled_seq: Arc<AtomicI64>,
    pub durable_cursor: Arc<AtomicI64>,
}

enum Reconnect {
    /// Resume after the last handled seq.
    Handled,
    /// Resume from the committed cursor (the relay dropped us as too slow).
    Durable,
    /// Tail live without a cursor.
    Live,
}

impl RelaySource {
    fn cursor_for(&self, how: &Reconnect) -> Option<i64> {
        let load = |a: &AtomicI64| Some(a.load(Ordering::Relaxed)).filter(|&v| v >= 0);
        match how {
            Reconnect::Live => None,
            // Nothing committed yet: the handled seq is the best resume point we have.
            Reconnect::Durable => load(&self.durable_cursor)
                .or_else(|| load(&self.handled_seq))
                .or(self.start_cursor),
            Reconnect::Handled => load(&self.handled_seq)
                .or_else(|| load(&self.durable_cursor))
                .or(self.start_cursor),
        }
    }

    /// Runs until shutdown; returns an error only for conditions an operator must see
    /// (FutureCursor with the `exit` policy, processor gone).
    pub async fn run(
        self,
        tx: mpsc::Sender<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut attempt: u32 = 0;
        let mut how = if self.start_cursor.is_some() {
            Reconnect::Handled
        } else {
            Reconnect::Live
        };
        let mut first = true;
        // The last frame received: before the processor has handled anything, its seq is the
        // resume point (a live tail that drops must not skip what came in meanwhile). Kept as
        // the shared buffer itself and parsed only when needed.
        let mut last_frame: Option<Bytes> = None;
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
            if matches!(how, Reconnect::Live) {
                last_frame = None;
            }
            let cursor = self
                .cursor_for(&how)
                .or_else(|| last_frame.as_deref().and_then(frame_seq));
            let url = match cursor {
                Some(c) => format!("{}?cursor={c}", self.url),
                None => self.url.clone(),
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(WS_MAX_MESSAGE))
                .max_frame_size(Some(WS_MAX_MESSAGE));
            let connect = tokio_tungstenite::connect_async_with_config(&url, Some(config), false);
            let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(e)) => {
                    warn!(%url, error = %e, "connect failed");
                    self.metrics
                        .set_source_error(Some(format!("connect {url}: {e}")));
                    continue;
                }
                Err(_) => {
                    warn!(%url, "connect timed out");
                    continue;
                }
            };
            info!(%url, ?cursor, "connected");
            self.metrics.set_connected(true);
            // After FutureCursor -> live, seqs restart lower: the processor must accept them.
            let mut reset_seq =
                matches!(how, Reconnect::Live) && self.handled_seq.load(Ordering::Relaxed) >= 0;
            let mut ping = tokio::time::interval(
                PING_EVERY
                    .min(self.stall_timeout / 2)
                    .max(Duration::from_millis(100)),
            );
            ping.tick().await;
            // The stall watchdog measures time since the last event (binary message), not since
            // the last wake-up: pings, pongs and other control traffic must not reset it.
            let mut last_event = tokio::time::Instant::now();
            let mut first_event = true;
            // Frames already received are handed over in batches: one channel operation (and at
            // most one processor wake-up) per batch instead of per frame.
            let mut batch = Batch::default();
            let outcome: Result<Option<Reconnect>> = loop {
                let ready = if batch.is_full() || batch.frames.is_empty() {
                    None
                } else {
                    ws.next().now_or_never()
                };
                let next = match ready {
                    Some(next) => next,
                    None => {
                        if !batch.frames.is_empty() {
                            if tx.send(batch.take()).await.is_err() {
                                break Ok(None);
                            }
                            // A full channel (slow disk) may have held us here for long: the
                            // watchdog measures upstream silence, not our own backpressure.
                            last_event = tokio::time::Instant::now();
                        }
                        tokio::select! {
                            // Data first: an expired watchdog must not win over a ready message.
                            biased;
                            _ = shutdown.changed() => {
                                let _ = ws.close(None).await;
                                break Ok(None);
                            }
                            next = ws.next() => next,
                            _ = ping.tick() => {
                                if let Err(e) = ws.send(Message::Ping(Bytes::new())).await {
                                    warn!(error = %e, "ping failed");
                                    break Ok(Some(Reconnect::Handled));
                                }
                                continue;
                            }
                            _ = tokio::time::sleep_until(last_event + self.stall_timeout) => {
                                self.metrics.stalls.fetch_add(1, Ordering::Relaxed);
                                warn!(stall_timeout_s = self.stall_timeout.as_secs_f64(), "no event within the stall timeout; reconnecting");
                                break Ok(Some(Reconnect::Handled));
                            }
                        }
                    }
                };
                let message = match next {
                    None => {
                        warn!("relay closed the connection");
                        break Ok(Some(Reconnect::Handled));
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "websocket error");
                        if e.to_string().contains("Space limit exceeded") {
                            self.metrics.dropped("frame_too_large");
                        }
                        break Ok(Some(Reconnect::Handled));
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
                            match self.handle_error_frame(&bytes, cursor) {
                                Ok(next) => break Ok(Some(next)),
                                Err(e) => break Err(e),
                            }
                        }
                        if reset_seq {
                            reset_seq = false;
                            if tx.send(Input::ResetSeq).await.is_err() {
                                break Ok(None);
                            }
                        }
                        if first_event {
                            // Events flow again: a connection problem is over.
                            self.metrics.set_source_error(None);
                            first_event = false;
                        }
                        last_frame = Some(bytes.clone());
                        self.metrics.frame_arrived();
                        batch.push(bytes);
                        last_event = tokio::time::Instant::now();
                        attempt = 0;
                    }
                    Message::Text(_) => self.metrics.dropped("text_message"),
                    Message::Close(frame) => {
                        info!(?frame, "relay sent close");
                        break Ok(Some(Reconnect::Handled));
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            };
            // Whatever arrived before the connection ended is still handled, in order.
            if !batch.frames.is_empty() {
                let _ = tx.send(batch.take()).await;
            }
            self.metrics.set_connected(false);
            match outcome? {
                None => return Ok(()),
                Some(next) => how = next,
            }
            if tx.is_closed() {
                return Ok(());
            }
        }
    }

    fn handle_error_frame(&self, bytes: &[u8], cursor: Option<i64>) -> Result<Reconnect> {
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
            "FutureCursor" => match self.on_future_cursor {
                FutureCursorPolicy::Live => {
                    error!(?cursor, ?message, "relay answered FutureCursor; --on-future-cursor=live: dropping the cursor and tailing live (events between the cursor and now are not captured)");
                    Ok(Reconnect::Live)
                }
                FutureCursorPolicy::Exit => Err(anyhow::Error::new(crate::NeedsOperator(format!(
                    "relay answered FutureCursor for cursor {cursor:?} ({}): the stored cursor is ahead of this relay (a different relay or a reset?). Fix the relay URL, pass --cursor, or set --on-future-cursor=live to tail live",
                    message.unwrap_or_default()
                )))),
            },
            "ConsumerTooSlow" => {
                warn!(?message, "relay dropped us as too slow; reconnecting from the durable cursor");
                Ok(Reconnect::Durable)
            }
            other => {
                warn!(error = other, ?message, "relay error frame; reconnecting");
                Ok(Reconnect::Handled)
            }
        }
    }
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
