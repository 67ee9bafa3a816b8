//! Best-effort removal of a deleted volume's data: after the deletion has committed, punch the
//! volume's object (container = object = the volume's uuid) on every target of its pool that
//! was placeable on an Up engine. Failures are logged; the deletion stands regardless (an
//! engine that missed it keeps orphaned data that nothing references).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures::future::join_all;
use tessera_engine_client::hlc;
use tessera_engine_client::{ConnectionOptions, EngineConnection};
use tessera_engine_proto::{ContainerId, ObjectId, Punch, PunchTarget, Request};
use tracing::{info, warn};

use crate::machine::PunchPlan;

/// Punches the volume on every site of `plan`, one connection per engine, all targets of an
/// engine at once. Returns how many targets acknowledged.
pub async fn punch_volume(plan: PunchPlan) -> usize {
    let mut by_engine: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for s in &plan.sites {
        by_engine.entry(s.address.as_str()).or_default().push(s.target);
    }
    let id = plan.uuid.as_u128();
    let epoch = hlc::global().now();
    let engines = by_engine.into_iter().map(|(address, targets)| {
        let plan = &plan;
        async move {
            let addr: SocketAddr = match address.parse() {
                Ok(a) => a,
                Err(_) => {
                    warn!(volume = %plan.uuid, address, "cannot punch deleted volume: bad engine address");
                    return 0;
                }
            };
            // Background work, not a host's: the engines neither count it as host I/O nor hold
            // it to their commit window (its epoch was taken before connecting to every engine).
            let opts = ConnectionOptions { map_version: plan.map_version, background: true, ..ConnectionOptions::default() };
            let conn = match EngineConnection::connect(addr, opts).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(volume = %plan.uuid, %addr, error = %e, "cannot punch deleted volume: engine unreachable");
                    return 0;
                }
            };
            let calls = targets.iter().map(|&t| {
                let conn = &conn;
                async move {
                    let req = Request::Punch(Punch { cont: ContainerId(id), obj: ObjectId(id), epoch, what: PunchTarget::Object });
                    (t, conn.call_at(plan.pool_id, plan.map_version, t, req).await)
                }
            });
            let mut ok = 0;
            for (t, r) in join_all(calls).await {
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => warn!(volume = %plan.uuid, %addr, target = t, error = %e, "punch of deleted volume failed"),
                }
            }
            ok
        }
    });
    let done: usize = join_all(engines).await.into_iter().sum();
    info!(volume = %plan.uuid, punched = done, targets = plan.sites.len(), "deleted volume's data punched");
    done
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::BytesMut;
    use tessera_engine_proto::{decode_frame, encode_reply, FrameLimits, Opcode, Reply, RpcStatus};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use uuid::Uuid;

    use super::*;
    use crate::machine::PunchSite;

    /// (pool, map version, target, request, marked background) of every request received.
    type Seen = Arc<Mutex<Vec<(u32, u32, u16, Request, bool)>>>;

    /// A fake engine: answers every Punch with success, except on `failing_target`.
    async fn fake_engine(failing_target: u16) -> (String, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        while let Some(frame) = decode_frame(&mut buf, &FrameLimits::default()).unwrap() {
                            let h = frame.header;
                            let req = Request::decode(&frame).unwrap();
                            seen.lock().unwrap().push((h.pool, h.map_version, h.target, req, h.is_background()));
                            let result = if h.target == failing_target {
                                Err((RpcStatus::InvalidRequest, "refused".to_string()))
                            } else {
                                Ok(Reply::Punched)
                            };
                            let reply = encode_reply(h.request_id, Opcode::Punch, h.map_version, h.target, &result);
                            sock.write_all(&reply.to_bytes()).await.unwrap();
                        }
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn punches_every_site_and_survives_failures() {
        let (a, seen_a) = fake_engine(u16::MAX).await;
        let (b, seen_b) = fake_engine(1).await;
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let uuid = Uuid::from_u128(0x1234_5678_9abc);
        let site = |address: &str, target| PunchSite { address: address.to_string(), target };
        let plan = PunchPlan {
            uuid,
            pool_id: 7,
            map_version: 3,
            sites: vec![site(&a, 0), site(&a, 2), site(&b, 0), site(&b, 1), site(&closed, 0), site("not an address", 0)],
        };
        // a: 2 acknowledged; b: 1 of 2; the closed port and the bad address: none.
        assert_eq!(punch_volume(plan).await, 3);
        let mut got = seen_a.lock().unwrap().clone();
        got.extend(seen_b.lock().unwrap().iter().cloned());
        assert_eq!(got.len(), 4);
        let mut targets: Vec<u16> = got.iter().map(|(_, _, t, _, _)| *t).collect();
        targets.sort();
        assert_eq!(targets, [0, 0, 1, 2]);
        for (pool, version, _, req, background) in got {
            assert_eq!((pool, version), (7, 3));
            assert!(background, "clean-up is not host I/O: not held to the commit window");
            let Request::Punch(p) = req else { panic!("{req:?}") };
            assert_eq!((p.cont, p.obj, p.what), (ContainerId(uuid.as_u128()), ObjectId(uuid.as_u128()), PunchTarget::Object));
            assert!(p.epoch > 0);
        }
    }
}
