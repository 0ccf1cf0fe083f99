//! Tests of the in-memory test relay itself, with a plain tokio-tungstenite client.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sync_core::frame::{decode_frame, Event, FrameError};
use sync_core::synth;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{
    connect_async, connect_async_with_config, MaybeTlsStream, WebSocketStream,
};
use workspace_tests::relay::{frame_seq, garbage_messages, load_capture, Fault, TestRelay};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

fn did(n: i64) -> String {
    format!("did:plc:{:0>24}", n)
}

fn frame(seq: i64) -> Vec<u8> {
    synth::identity_frame(seq, &did(seq), None, "2024-01-01T00:00:00.000Z")
}

fn frames(seqs: impl IntoIterator<Item = i64>) -> Vec<Vec<u8>> {
    seqs.into_iter().map(frame).collect()
}

async fn connect(url: &str) -> Client {
    let (ws, _) = connect_async(url).await.expect("connect");
    ws
}

/// The next message, `None` when nothing arrives within `wait`.
async fn next_within(ws: &mut Client, wait: Duration) -> Option<Option<Result<Message, WsError>>> {
    tokio::time::timeout(wait, ws.next()).await.ok()
}

async fn next_binary(ws: &mut Client) -> Vec<u8> {
    match next_within(ws, WAIT).await {
        Some(Some(Ok(Message::Binary(b)))) => b.to_vec(),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

async fn next_seqs(ws: &mut Client, n: usize) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(frame_seq(&next_binary(ws).await));
    }
    out
}

fn some(seqs: impl IntoIterator<Item = i64>) -> Vec<Option<i64>> {
    seqs.into_iter().map(Some).collect()
}

async fn assert_quiet(ws: &mut Client) {
    if let Some(msg) = next_within(ws, QUIET).await {
        panic!("expected nothing, got {msg:?}");
    }
}

/// Asserts the server ends the connection (close frame or EOF) without sending more data.
async fn assert_closed(ws: &mut Client) {
    match next_within(ws, WAIT).await {
        Some(Some(Ok(Message::Close(_)))) | Some(None) | Some(Some(Err(_))) => {}
        other => panic!("expected the connection to close, got {other:?}"),
    }
}

fn error_of(bytes: &[u8]) -> (String, Option<String>) {
    match decode_frame(bytes).expect("error frame decodes") {
        Event::Error(e) => (e.error, e.message),
        other => panic!("expected an error frame, got {}", other.kind()),
    }
}

#[tokio::test]
async fn no_cursor_is_live_tail() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    let mut ws = connect(&relay.url()).await;
    assert_quiet(&mut ws).await;
    assert_eq!(relay.subscriptions(), 1);
    relay.push(frame(6));
    relay.push(frame(7));
    assert_eq!(next_seqs(&mut ws, 2).await, some([6, 7]));
    assert_eq!(relay.cursors(), vec![None]);
    assert_eq!(relay.connections(), 1);
    assert_eq!(relay.frames_sent(), 2);
    relay.shutdown().await;
}

#[tokio::test]
async fn cursor_replays_frames_after_it_then_live() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    let mut ws = connect(&relay.url_with_cursor(2)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some([3, 4, 5]));
    assert_quiet(&mut ws).await;
    relay.push(frame(6));
    assert_eq!(next_seqs(&mut ws, 1).await, some([6]));

    // A later cursor also sees the pushed frame; cursor 0 replays everything.
    let mut ws2 = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws2, 6).await, some(1..=6));
    // The highest seq itself is not a future cursor: nothing to replay, live frames follow.
    let mut ws3 = connect(&relay.url_with_cursor(6)).await;
    assert_quiet(&mut ws3).await;
    relay.push(frame(7));
    assert_eq!(next_seqs(&mut ws3, 1).await, some([7]));
    assert_eq!(next_seqs(&mut ws, 1).await, some([7]));
    assert_eq!(next_seqs(&mut ws2, 1).await, some([7]));
    assert_eq!(relay.cursors(), vec![Some(2), Some(0), Some(6)]);
    assert_eq!(relay.last_seq(), Some(7));
    relay.shutdown().await;
}

#[tokio::test]
async fn seqless_frames_are_sent_in_position() {
    let info = synth::info_frame("Note", Some("between 2 and 3"));
    let relay = TestRelay::start(vec![frame(1), frame(2), info.clone(), frame(3)])
        .await
        .unwrap();
    let mut ws = connect(&relay.url_with_cursor(1)).await;
    assert_eq!(next_binary(&mut ws).await, frame(2));
    assert_eq!(next_binary(&mut ws).await, info);
    assert_eq!(next_binary(&mut ws).await, frame(3));
    let mut ws = connect(&relay.url_with_cursor(2)).await;
    assert_eq!(next_binary(&mut ws).await, info);
    assert_eq!(next_binary(&mut ws).await, frame(3));
    relay.shutdown().await;
}

#[tokio::test]
async fn future_cursor_gets_error_frame_and_close() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    let mut ws = connect(&relay.url_with_cursor(6)).await;
    let (error, message) = error_of(&next_binary(&mut ws).await);
    assert_eq!(error, "FutureCursor");
    assert_eq!(message.as_deref(), Some("Cursor in the future."));
    assert_closed(&mut ws).await;
    assert_eq!(relay.frames_sent(), 0);
    assert_eq!(
        relay.subscriptions(),
        0,
        "an error answer is not a subscription"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn outdated_cursor_gets_info_first_then_oldest() {
    let relay = TestRelay::start_with_window(frames(100..=104), Some(10))
        .await
        .unwrap();
    let mut ws = connect(&relay.url_with_cursor(50)).await;
    match decode_frame(&next_binary(&mut ws).await).unwrap() {
        Event::Info(info) => {
            assert_eq!(info.name, "OutdatedCursor");
            assert!(info.message.is_some());
        }
        other => panic!("expected #info, got {}", other.kind()),
    }
    assert_eq!(next_seqs(&mut ws, 5).await, some(100..=104));

    // Within the window: plain replay, no notice.
    let mut ws = connect(&relay.url_with_cursor(95)).await;
    assert_eq!(next_seqs(&mut ws, 5).await, some(100..=104));
    let mut ws = connect(&relay.url_with_cursor(102)).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([103, 104]));

    // Without a window nothing is outdated.
    let relay2 = TestRelay::start(frames(100..=104)).await.unwrap();
    let mut ws = connect(&relay2.url_with_cursor(1)).await;
    assert_eq!(next_seqs(&mut ws, 5).await, some(100..=104));
    relay.shutdown().await;
    relay2.shutdown().await;
}

#[tokio::test]
async fn unknown_path_is_404_and_bad_cursor_400() {
    let relay = TestRelay::start(frames(1..=2)).await.unwrap();
    let url = format!("ws://{}/xrpc/com.atproto.sync.getRepo", relay.addr());
    match connect_async(url.as_str()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| ())),
    }
    match connect_async(format!("{}?cursor=abc", relay.url())).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected HTTP 400, got {:?}", other.map(|_| ())),
    }
    // A plain HTTP request to an unknown path.
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert_eq!(relay.connections(), 3);
    assert!(relay.cursors().is_empty());
    relay.shutdown().await;
}

#[tokio::test]
async fn pings_are_answered() {
    let relay = TestRelay::start(frames(1..=2)).await.unwrap();
    let mut ws = connect(&relay.url()).await;
    ws.send(Message::Ping(b"hello"[..].into())).await.unwrap();
    match next_within(&mut ws, WAIT).await {
        Some(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"hello"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // A client close is answered with a close frame.
    ws.close(None).await.unwrap();
    assert_closed(&mut ws).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn concurrent_connections_each_get_everything() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    let mut a = connect(&relay.url_with_cursor(0)).await;
    let mut b = connect(&relay.url_with_cursor(0)).await;
    let mut live = connect(&relay.url()).await;
    assert_eq!(next_seqs(&mut a, 3).await, some(1..=3));
    assert_eq!(next_seqs(&mut b, 3).await, some(1..=3));
    // The live tail starts where the log ends when its start point is fixed, not at accept.
    assert!(relay.wait_for_subscriptions(3, WAIT).await);
    relay.push(frame(4));
    for ws in [&mut a, &mut b, &mut live] {
        assert_eq!(next_seqs(ws, 1).await, some([4]));
    }
    assert_eq!(relay.connections(), 3);
    assert_eq!(relay.frames_sent(), 9);
    relay.shutdown().await;
}

#[tokio::test]
async fn drop_after_closes_without_close_frame_once() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    relay.set_fault(Fault::DropAfter(2));
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([1, 2]));
    match next_within(&mut ws, WAIT).await {
        Some(None) | Some(Some(Err(_))) => {}
        other => panic!("expected an abrupt end, got {other:?}"),
    }
    // Once: the reconnection is served normally.
    let mut ws = connect(&relay.url_with_cursor(2)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(3..=5));
    assert_eq!(relay.cursors(), vec![Some(0), Some(2)]);
    relay.shutdown().await;
}

#[tokio::test]
async fn stall_after_goes_silent_once() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    relay.set_fault(Fault::StallAfter(2));
    let mut stalled = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut stalled, 2).await, some([1, 2]));
    stalled
        .send(Message::Ping(b"anyone?"[..].into()))
        .await
        .unwrap();
    relay.push(frame(6));
    assert_quiet(&mut stalled).await;

    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 6).await, some(1..=6));
    ws.send(Message::Ping(b"p"[..].into())).await.unwrap();
    assert!(matches!(
        next_within(&mut ws, WAIT).await,
        Some(Some(Ok(Message::Pong(_))))
    ));
    assert_quiet(&mut stalled).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn garbage_after_sends_undecodable_messages_then_continues() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    relay.set_fault(Fault::GarbageAfter(1, 4));
    let expected = garbage_messages(4);
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 1).await, some([1]));
    for want in &expected {
        let got = next_binary(&mut ws).await;
        assert_eq!(&got, want);
        assert!(decode_frame(&got).is_err());
    }
    assert_eq!(next_seqs(&mut ws, 2).await, some([2, 3]));
    // Deterministic and distinct.
    assert_eq!(garbage_messages(4), expected);
    assert_ne!(expected[0], expected[1]);
    // Once.
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(1..=3));
    assert_eq!(relay.frames_sent(), 6);
    relay.shutdown().await;
}

#[tokio::test]
async fn oversized_after_sends_one_huge_message() {
    const SIZE: usize = 6 * 1024 * 1024;
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    relay.set_fault(Fault::OversizedAfter(2, SIZE));
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([1, 2]));
    let big = next_binary(&mut ws).await;
    assert_eq!(big.len(), SIZE);
    assert_eq!(decode_frame(&big).unwrap_err(), FrameError::TooLarge(SIZE));
    assert_eq!(next_seqs(&mut ws, 1).await, some([3]));

    // A client with the firehose limit rejects it.
    relay.set_fault(Fault::OversizedAfter(0, SIZE));
    let config = WebSocketConfig::default().max_message_size(Some(5 * 1024 * 1024));
    let (mut ws, _) = connect_async_with_config(relay.url_with_cursor(0), Some(config), false)
        .await
        .unwrap();
    match next_within(&mut ws, WAIT).await {
        Some(Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. })))) => {}
        other => panic!("expected a capacity error, got {other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn error_frame_fault_answers_next_connection_once() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    relay.set_fault(Fault::ErrorFrame("ConsumerTooSlow".into()));
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    let (error, _) = error_of(&next_binary(&mut ws).await);
    assert_eq!(error, "ConsumerTooSlow");
    assert_closed(&mut ws).await;
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(1..=3));
    relay.shutdown().await;
}

#[tokio::test]
async fn error_frame_after_n_frames_then_close_once() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    relay.set_fault(Fault::ErrorFrameAfter(2, "ConsumerTooSlow".into()));
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([1, 2]));
    let (error, _) = error_of(&next_binary(&mut ws).await);
    assert_eq!(error, "ConsumerTooSlow");
    assert_closed(&mut ws).await;
    let mut ws = connect(&relay.url_with_cursor(2)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(3..=5));
    assert_eq!(relay.subscriptions(), 2);
    relay.shutdown().await;
}

/// Connects with a raw TCP socket and returns the WebSocket frame headers
/// `(fin, opcode, payload)` of the first `n` frames.
async fn raw_frames(relay: &TestRelay, query: &str, n: usize) -> Vec<(bool, u8, Vec<u8>)> {
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let mut tcp = BufReader::new(tcp);
    let request = format!(
        "GET /xrpc/com.atproto.sync.subscribeRepos{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.get_mut().write_all(request.as_bytes()).await.unwrap();
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    let mut accept_ok = false;
    loop {
        line.clear();
        tcp.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        accept_ok |= line.trim() == "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    }
    assert!(accept_ok, "RFC 6455 sample accept key");
    let mut out = Vec::new();
    for _ in 0..n {
        let b0 = tcp.read_u8().await.unwrap();
        let b1 = tcp.read_u8().await.unwrap();
        assert_eq!(b1 & 0x80, 0, "server frames are not masked");
        let len = match b1 & 0x7f {
            126 => u64::from(tcp.read_u16().await.unwrap()),
            127 => tcp.read_u64().await.unwrap(),
            l => u64::from(l),
        };
        let mut payload = vec![0; len as usize];
        tcp.read_exact(&mut payload).await.unwrap();
        out.push((b0 & 0x80 != 0, b0 & 0x0f, payload));
    }
    out
}

#[tokio::test]
async fn fragment_splits_messages_into_continuation_frames() {
    let originals = frames(1..=3);
    let relay = TestRelay::start(originals.clone()).await.unwrap();
    relay.set_fault(Fault::Fragment(4));

    // On the wire: binary (not final), continue, continue, continue (final).
    let raw = raw_frames(&relay, "?cursor=0", 8).await;
    let shape: Vec<(bool, u8)> = raw.iter().map(|(fin, op, _)| (*fin, *op)).collect();
    let one = [(false, 2), (false, 0), (false, 0), (true, 0)];
    assert_eq!(shape, [one, one].concat());
    let first: Vec<u8> = raw[..4].iter().flat_map(|(_, _, p)| p.clone()).collect();
    assert_eq!(first, originals[0]);

    // A client reassembles the original bytes, on every connection until reset.
    for _ in 0..2 {
        let mut ws = connect(&relay.url_with_cursor(0)).await;
        for want in &originals {
            assert_eq!(&next_binary(&mut ws).await, want);
        }
        relay.push(frame(4));
        assert_eq!(next_binary(&mut ws).await, frame(4));
        relay.set_fault(Fault::Fragment(1000)); // longer than any frame: 1-byte frames
    }

    relay.set_fault(Fault::None);
    let raw = raw_frames(&relay, "?cursor=0", 2).await;
    assert!(raw.iter().all(|(fin, op, _)| *fin && *op == 2));
    assert_eq!(raw[0].2, originals[0]);
    relay.shutdown().await;
}

#[tokio::test]
async fn refuse_next_closes_the_next_attempts() {
    let relay = TestRelay::start(frames(1..=2)).await.unwrap();
    relay.set_fault(Fault::RefuseNext(2));
    for _ in 0..2 {
        assert!(connect_async(relay.url_with_cursor(0)).await.is_err());
    }
    let mut ws = connect(&relay.url_with_cursor(1)).await;
    assert_eq!(next_seqs(&mut ws, 1).await, some([2]));
    assert_eq!(relay.connections(), 3);
    assert_eq!(relay.cursors(), vec![Some(0), Some(0), Some(1)]);
    relay.shutdown().await;
}

#[tokio::test]
async fn delay_slows_every_message_until_reset() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    relay.set_fault(Fault::Delay(Duration::from_millis(100)));
    let started = Instant::now();
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(1..=3));
    assert!(started.elapsed() >= Duration::from_millis(300));

    relay.set_fault(Fault::None);
    let started = Instant::now();
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_seqs(&mut ws, 3).await, some(1..=3));
    assert!(started.elapsed() < Duration::from_millis(300));
    relay.shutdown().await;
}

#[tokio::test]
async fn ignore_cursor_serves_cursors_from_the_start_until_reset() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    relay.set_fault(Fault::IgnoreCursor);
    // Neither a replayed cursor nor a future one is honoured.
    for cursor in [2, 99] {
        let mut ws = connect(&relay.url_with_cursor(cursor)).await;
        assert_eq!(next_seqs(&mut ws, 3).await, some(1..=3));
        assert_quiet(&mut ws).await;
    }
    // No cursor is still a live tail.
    let mut live = connect(&relay.url()).await;
    assert!(relay.wait_for_subscriptions(3, WAIT).await);
    relay.push(frame(4));
    assert_eq!(next_seqs(&mut live, 1).await, some([4]));
    relay.set_fault(Fault::None);
    let mut ws = connect(&relay.url_with_cursor(2)).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([3, 4]));
    relay.shutdown().await;
}

#[tokio::test]
async fn faults_of_different_kinds_combine() {
    let relay = TestRelay::start(frames(1..=4)).await.unwrap();
    relay.set_fault(Fault::Fragment(3));
    relay.set_fault(Fault::DropAfter(2));
    let mut ws = connect(&relay.url_with_cursor(0)).await;
    assert_eq!(next_binary(&mut ws).await, frame(1));
    assert_eq!(next_binary(&mut ws).await, frame(2));
    assert!(matches!(
        next_within(&mut ws, WAIT).await,
        Some(None) | Some(Some(Err(_)))
    ));
    relay.shutdown().await;
}

#[tokio::test]
async fn serves_the_fixture_capture_byte_for_byte() {
    let Some(fixtures) = workspace_tests::fixtures() else {
        return;
    };
    let frames = load_capture(&fixtures.join("relay-capture/frames.bin")).unwrap();
    assert_eq!(frames.len(), 150);
    let seqs: Vec<i64> = frames.iter().map(|f| frame_seq(f).unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let relay = TestRelay::start(frames.clone()).await.unwrap();
    assert_eq!(relay.last_seq(), seqs.last().copied());

    let mut ws = connect(&relay.url_with_cursor(seqs[0] - 1)).await;
    for want in &frames {
        assert_eq!(&next_binary(&mut ws).await, want);
    }
    assert_quiet(&mut ws).await;
    assert_eq!(relay.frames_sent(), 150);

    // From the middle.
    let mut ws = connect(&relay.url_with_cursor(seqs[99])).await;
    for want in &frames[100..] {
        assert_eq!(&next_binary(&mut ws).await, want);
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn test_relay_binary_serves_a_capture_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frames.bin");
    std::fs::write(&path, synth::capture(&frames(10..=12))).unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_test-relay"))
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    });
    let url = tokio::time::timeout(WAIT, url)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = url.trim();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    assert!(
        url.ends_with("/xrpc/com.atproto.sync.subscribeRepos"),
        "{url}"
    );
    let mut ws = connect(&format!("{url}?cursor=10")).await;
    assert_eq!(next_seqs(&mut ws, 2).await, some([11, 12]));
    drop(child);
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let relay = TestRelay::start(frames(1..=2)).await.unwrap();
    relay.set_fault(Fault::StallAfter(0));
    let mut stalled = connect(&relay.url()).await;
    let mut live = connect(&relay.url()).await;
    let url = relay.url();
    tokio::time::timeout(WAIT, relay.shutdown()).await.unwrap();
    assert_closed(&mut stalled).await;
    assert_closed(&mut live).await;
    assert!(connect_async(url).await.is_err());
}
