//! `EngineConnection` against small in-test engines built on `tessera-engine-proto`'s decoder:
//! one that answers a batch of requests in reverse order with delays (pipelining and out-of-order
//! matching), one that closes mid-flight, one that never answers, one that breaks the framing,
//! and one that answers with errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_engine_client::{ConnectionOptions, EngineConnection, RpcError};
use tessera_engine_proto::frame::{RawHeader, U32Le, HEADER_LEN};
use tessera_engine_proto::{
    decode_frame, encode_reply, ContainerId, Fetch, FetchReply, FetchValue, Frame, FrameError, FrameLimits, ObjectId, Opcode, Reply,
    Request, RpcStatus, Update, UpdateValue,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The engine side of one connection: frames in, bytes out.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    /// The next request, or `None` at end of stream.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, &FrameLimits::default()).expect("client sent a bad frame") {
                return Some(f);
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to client");
    }

    async fn reply(&mut self, req: &Frame, reply: Result<Reply, (RpcStatus, String)>) {
        let e = encode_reply(req.header.request_id, req.header.opcode, 5, req.header.target, &reply);
        self.send(&e.to_bytes()).await;
    }
}

/// Starts an engine that runs `serve` on its first connection.
async fn engine<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(Peer { stream, buf: BytesMut::new() }).await;
    });
    addr
}

fn opts(timeout_ms: u64) -> ConnectionOptions {
    ConnectionOptions { timeout: Duration::from_millis(timeout_ms), ..ConnectionOptions::default() }
}

/// What the reversing engine answers: a function of the request, so each caller can check that
/// it got its own reply.
fn answer(req: &Request, target: u16) -> Reply {
    match req {
        Request::Ping => Reply::Pong { rank: u32::from(target), targets: 8, map_version: 5 },
        Request::Update(_) => Reply::Updated,
        Request::Fetch(f) => {
            let FetchValue::Array { offset, len } = f.what else { panic!("array fetches only") };
            let data: Vec<u8> = (0..len).map(|i| (offset + u64::from(i)) as u8).collect();
            Reply::Fetched(FetchReply::array(Bytes::from(data), vec![]))
        }
        other => panic!("unexpected request {other:?}"),
    }
}

/// An array update of `data` at offset 0 of object `obj` (container 1, dkey "d", akey "a").
fn update(obj: usize, data: Bytes) -> Request {
    Request::Update(Update {
        cont: ContainerId(1),
        obj: ObjectId(obj as u128),
        epoch: 1,
        dkey: Bytes::from_static(b"d"),
        akey: Bytes::from_static(b"a"),
        value: UpdateValue::array(0, data),
    })
}

fn fetch(offset: u64, len: u32) -> Request {
    Request::Fetch(Fetch {
        cont: ContainerId(1),
        obj: ObjectId(2),
        epoch: 3,
        dkey: Bytes::from_static(b"d"),
        akey: Bytes::from_static(b"a"),
        what: FetchValue::Array { offset, len },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_are_matched_out_of_order() {
    const N: usize = 48;
    let addr = engine(|mut peer| async move {
        // Take every request before answering any: the client must have pipelined them.
        let mut reqs = Vec::new();
        while reqs.len() < N {
            let f = peer.recv().await.expect("request");
            let req = Request::decode(&f).expect("valid request");
            if let Request::Update(u) = &req {
                assert_eq!(u.value.verify(), Ok(()), "update payload arrived intact");
            }
            reqs.push((f, req));
        }
        // Answer in reverse order, some after a delay.
        for (i, (f, req)) in reqs.iter().rev().enumerate() {
            if i % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peer.reply(f, Ok(answer(req, f.header.target))).await;
        }
        // Keep the connection open until the client is done.
        let _ = peer.recv().await;
    })
    .await;

    let conn = EngineConnection::connect(addr, opts(10_000)).await.unwrap();
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let conn = conn.clone();
        tasks.spawn(async move {
            let target = i as u16;
            match i % 3 {
                0 => {
                    let r = conn.call(target, Request::Ping).await.unwrap();
                    assert_eq!(r, Reply::Pong { rank: i as u32, targets: 8, map_version: 5 });
                }
                1 => {
                    let req = update(i, Bytes::from(vec![i as u8; 5000 + i * 100]));
                    assert_eq!(conn.call(target, req).await.unwrap(), Reply::Updated);
                }
                _ => {
                    let (offset, len) = (i as u64 * 1000, 4096 + i as u32);
                    let Reply::Fetched(f) = conn.call(target, fetch(offset, len)).await.unwrap() else { panic!("not a fetch reply") };
                    assert_eq!(f.verify(), Ok(()));
                    let data = f.data();
                    assert_eq!(data.len(), len as usize);
                    assert!(data.iter().enumerate().all(|(j, &b)| b == (offset + j as u64) as u8), "call {i} got someone else's data");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(conn.in_flight(), 0);
    assert_eq!(conn.engine_map_version(), 5);
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_what_the_socket_takes_arrive_whole_and_in_order() {
    // Callers send large updates faster than the engine reads them (it verifies every byte and
    // at first reads nothing at all): the socket fills and empties over and over while callers
    // write their own frames, queue behind another writer, or leave the rest to the writer task.
    // Every frame must arrive intact, none interleaved with another.
    const TASKS: usize = 8;
    const CALLS: usize = 8;
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = engine(|mut peer| async move {
        go_rx.await.unwrap();
        let mut seen = [false; TASKS * CALLS];
        for _ in 0..TASKS * CALLS {
            let f = peer.recv().await.expect("request");
            let Request::Update(u) = Request::decode(&f).expect("valid request") else { panic!("not an update") };
            assert_eq!(u.value.verify(), Ok(()), "update payload arrived intact");
            let i = u.obj.0 as usize;
            assert!(!seen[i], "update {i} twice");
            seen[i] = true;
            peer.reply(&f, Ok(Reply::Updated)).await;
        }
        let _ = peer.recv().await;
    })
    .await;

    let conn = EngineConnection::connect(addr, opts(20_000)).await.unwrap();
    let mut tasks = JoinSet::new();
    for t in 0..TASKS {
        let conn = conn.clone();
        tasks.spawn(async move {
            for c in 0..CALLS {
                let i = t * CALLS + c;
                let req = update(i, Bytes::from(vec![i as u8; (2 << 20) + i * 4096]));
                assert_eq!(conn.call(0, req).await.unwrap(), Reply::Updated);
            }
        });
    }
    // The engine starts reading once every task has a call in flight (the socket is full by then).
    let deadline = Instant::now() + Duration::from_secs(20);
    while conn.in_flight() < TASKS {
        assert!(Instant::now() < deadline, "only {} calls made", conn.in_flight());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    go_tx.send(()).unwrap();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(conn.in_flight(), 0);
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_mid_flight_fails_every_pending_call_and_later_calls_fast() {
    let addr = engine(|mut peer| async move {
        // Answer the first request, then hang up with three more in flight.
        let f = peer.recv().await.unwrap();
        peer.reply(&f, Ok(Reply::Pong { rank: 0, targets: 1, map_version: 0 })).await;
        for _ in 0..3 {
            peer.recv().await.unwrap();
        }
        drop(peer);
    })
    .await;
    let conn = EngineConnection::connect(addr, opts(30_000)).await.unwrap();
    assert!(matches!(conn.call(0, Request::Ping).await, Ok(Reply::Pong { .. })));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..3 {
        let conn = conn.clone();
        tasks.spawn(async move { conn.call(0, Request::Ping).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(matches!(r.unwrap(), Err(RpcError::Closed)));
    }
    // Far sooner than the 30 s timeout: nobody waited for it.
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(conn.is_closed());
    assert_eq!(conn.in_flight(), 0);
    let start = Instant::now();
    assert!(matches!(conn.call(0, Request::QueryTarget).await, Err(RpcError::Closed)));
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_engine_times_out_and_late_replies_are_dropped() {
    let addr = engine(|mut peer| async move {
        // Never answer the first request until after its caller gave up; answer the rest.
        let first = peer.recv().await.unwrap();
        let second = peer.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        peer.reply(&first, Ok(Reply::Pong { rank: 1, targets: 1, map_version: 0 })).await;
        peer.reply(&second, Ok(Reply::Pong { rank: 2, targets: 1, map_version: 0 })).await;
        let third = peer.recv().await.unwrap();
        peer.reply(&third, Ok(Reply::Pong { rank: 3, targets: 1, map_version: 0 })).await;
        let _ = peer.recv().await;
    })
    .await;
    let conn = EngineConnection::connect(addr, opts(200)).await.unwrap();
    let (a, b) = tokio::join!(conn.call(0, Request::Ping), conn.call(0, Request::Ping));
    assert!(matches!(a, Err(RpcError::Timeout)), "{a:?}");
    assert!(matches!(b, Err(RpcError::Timeout)), "{b:?}");
    assert_eq!(conn.in_flight(), 0);
    // The late replies arrive for slots that moved on; the third call gets its own reply.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = conn.call(0, Request::Ping).await.unwrap();
    assert_eq!(c, Reply::Pong { rank: 3, targets: 1, map_version: 0 });
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_header_is_a_protocol_error_and_closes_the_connection() {
    let addr = engine(|mut peer| async move {
        let f = peer.recv().await.unwrap();
        let e = encode_reply(f.header.request_id, f.header.opcode, 0, 0, &Ok(Reply::Pong { rank: 0, targets: 1, map_version: 0 }));
        let mut bytes = e.to_bytes();
        // Flip a bit in the target field without fixing the header CRC.
        bytes[21] ^= 0x01;
        peer.send(&bytes).await;
        let _ = peer.recv().await;
    })
    .await;
    let conn = EngineConnection::connect(addr, opts(5_000)).await.unwrap();
    let r = conn.call(0, Request::Ping).await;
    assert!(matches!(r, Err(RpcError::Protocol(FrameError::HeaderCrc { .. }))), "{r:?}");
    assert!(conn.is_closed());
    assert!(matches!(conn.call(0, Request::Ping).await, Err(RpcError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_is_refused_from_its_header() {
    let addr = engine(|mut peer| async move {
        let f = peer.recv().await.unwrap();
        let e = encode_reply(f.header.request_id, f.header.opcode, 0, 0, &Ok(Reply::Pong { rank: 0, targets: 1, map_version: 0 }));
        let mut raw = RawHeader::read(&e.head).unwrap();
        raw.data_len = U32Le::new(u32::MAX);
        raw.header_crc = U32Le::new(raw.compute_crc());
        // Only the header: the client must not wait for 4 GiB.
        peer.send(&raw.as_bytes()[..HEADER_LEN]).await;
        let _ = peer.recv().await;
    })
    .await;
    let conn = EngineConnection::connect(addr, opts(5_000)).await.unwrap();
    let r = conn.call(0, Request::Ping).await;
    assert!(matches!(r, Err(RpcError::Protocol(FrameError::DataTooLarge { .. }))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_bad_replies_and_map_versions() {
    let addr = engine(|mut peer| async move {
        // 1: an error reply; its header carries the engine's newer map version.
        let f = peer.recv().await.unwrap();
        assert_eq!(f.header.map_version, 3);
        let e = encode_reply(f.header.request_id, f.header.opcode, 9, 0, &Err((RpcStatus::StaleMapVersion, "map 3 < 9".into())));
        peer.send(&e.to_bytes()).await;
        // 2: after set_map_version the request carries the new version; answer with the wrong
        // opcode.
        let f = peer.recv().await.unwrap();
        assert_eq!(f.header.map_version, 9);
        let e = encode_reply(f.header.request_id, Opcode::Punch, 9, 0, &Ok(Reply::Punched));
        peer.send(&e.to_bytes()).await;
        // 3: a good reply still works on the same connection.
        let f = peer.recv().await.unwrap();
        peer.reply(&f, Ok(Reply::Pong { rank: 7, targets: 2, map_version: 9 })).await;
        let _ = peer.recv().await;
    })
    .await;
    let conn = EngineConnection::connect(addr, ConnectionOptions { map_version: 3, ..ConnectionOptions::default() }).await.unwrap();
    match conn.call(1, Request::Ping).await {
        Err(RpcError::Remote { status, message }) => {
            assert_eq!(status, RpcStatus::StaleMapVersion);
            assert_eq!(message, "map 3 < 9");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(conn.engine_map_version(), 9);
    conn.set_map_version(conn.engine_map_version());
    assert_eq!(conn.map_version(), 9);
    assert!(matches!(conn.call(1, Request::Ping).await, Err(RpcError::BadReply(_))));
    assert_eq!(conn.call(1, Request::Ping).await.unwrap(), Reply::Pong { rank: 7, targets: 2, map_version: 9 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_closes_the_socket() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let addr = engine(|mut peer| async move {
        let f = peer.recv().await.unwrap();
        peer.reply(&f, Ok(Reply::Pong { rank: 0, targets: 1, map_version: 0 })).await;
        // End of stream once the client is gone.
        let _ = tx.send(peer.recv().await.is_none());
    })
    .await;
    let conn = EngineConnection::connect(addr, ConnectionOptions::default()).await.unwrap();
    let clone = conn.clone();
    clone.call(0, Request::Ping).await.unwrap();
    drop(conn);
    drop(clone);
    assert!(tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap());
}

#[tokio::test]
async fn connecting_to_nothing_is_an_io_error() {
    // Bind then drop a listener so the port is (very likely) closed.
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let r = EngineConnection::connect(addr, ConnectionOptions::default()).await;
    assert!(matches!(r, Err(RpcError::Io(_))), "{r:?}");
}
