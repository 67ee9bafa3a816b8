//! Best-effort removal of a deleted volume's data: after the deletion has committed, punch the
//! volume's object (container = object = the volume's uuid) on every target of its pool that
//! was placeable on an Up engine. Failures are logged; the deletion stands regardless (an
//! engine that missed it keeps orphaned data that nothing references).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures::future::join_all;
use tessera_client::hlc;
use tessera_client::proto::{ContainerId, ObjectId, Punch, PunchTarget, Request};
use tessera_client::{ConnectionOptions, EngineConnection};
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
            let opts = ConnectionOptions { map_version: plan.map_version, ..ConnectionOptions::default() };
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
