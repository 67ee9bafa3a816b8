//! Leadership among several `tessera-mgmt` processes sharing one etcd store.
//!
//! Each service holds an etcd lease ([`LEASE_TTL`]) and campaigns in the election
//! `{root}/leader` with its API address as value; the one elected is the leader
//! ([`Service::lead`]): it alone marks engines Down, starts rebuilds (through the map changes it
//! commits), expires floors and takes writes. The others follow ([`follow_store`]: every commit
//! changes the store's version key, which they watch, and they reload on each change) and send
//! writes and heartbeats to the leader (`http.rs`: 307 to the leader's address, which
//! [`watch_leader`] keeps).
//!
//! The leader renews its lease every third of its life; if a renewal does not come back before
//! the lease would expire on etcd, it stops acting as the leader first (a partitioned leader
//! steps down before another can be elected) and campaigns again. A leader that stops (SIGTERM)
//! resigns and revokes its lease, so another takes over at once; one that is killed is replaced
//! once its lease expires. Commits stay correct whatever the timing: each is a transaction on
//! the store's version, so two services that both believe they lead cannot both commit against
//! the same state.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::service::Service;

/// Life of the leader's lease, seconds: a killed leader is replaced within about this long.
pub const LEASE_TTL: i64 = 5;
/// The leader steps down this long before its lease would expire without a renewal.
const STEP_DOWN_MARGIN: Duration = Duration::from_secs(1);
/// Pause before trying again after etcd failed.
const RETRY: Duration = Duration::from_millis(500);

/// The election's name under `root`.
pub fn election_name(root: &str) -> String {
    format!("{}/leader", root.trim_end_matches('/'))
}

/// Campaigns as `me` (this service's API address) until `stop`, leading whenever elected.
pub async fn campaign(client: Client, root: String, me: String, svc: Arc<Service>, stop: CancellationToken) {
    let name = election_name(&root);
    while !stop.is_cancelled() {
        let mut c = client.clone();
        let lease = match c.lease_grant(LEASE_TTL, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                warn!("etcd: cannot take a lease, retrying: {e}");
                pause(&stop).await;
                continue;
            }
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, lost.clone()));
        let elected = tokio::select! {
            r = c.campaign(name.clone(), me.clone(), lease) => r,
            _ = lost.cancelled() => {
                warn!("etcd: the lease expired while campaigning; campaigning again");
                continue;
            }
            _ = stop.cancelled() => {
                give_up(&mut c, None, keeper, lease).await;
                break;
            }
        };
        let key = match elected {
            Ok(mut r) => r.take_leader(),
            Err(e) => {
                warn!("etcd: campaign failed, retrying: {e}");
                give_up(&mut c, None, keeper, lease).await;
                pause(&stop).await;
                continue;
            }
        };
        let s = svc.clone();
        let who = me.clone();
        match tokio::task::spawn_blocking(move || s.lead(&who)).await {
            Ok(Ok(())) => info!(addr = %me, version = svc.snapshot().version, "became the leader"),
            Ok(Err(e)) => {
                warn!("elected, but cannot load the state; resigning: {e}");
                give_up(&mut c, key, keeper, lease).await;
                pause(&stop).await;
                continue;
            }
            Err(e) => {
                warn!("elected, but the load failed; resigning: {e}");
                give_up(&mut c, key, keeper, lease).await;
                continue;
            }
        }
        tokio::select! {
            _ = lost.cancelled() => {
                svc.follow();
                warn!("lost the leadership: the lease could not be renewed in time; campaigning again");
            }
            _ = stop.cancelled() => {
                svc.follow();
                give_up(&mut c, key, keeper, lease).await;
                info!("resigned the leadership");
                break;
            }
        }
        keeper.abort();
    }
}

/// Leaves the election (if `key`, the leadership) and drops `lease`, so that another service
/// need not wait for it to expire.
async fn give_up(c: &mut Client, key: Option<LeaderKey>, keeper: tokio::task::JoinHandle<()>, lease: i64) {
    if let Some(k) = key {
        let _ = c.resign(Some(ResignOptions::new().with_leader(k))).await;
    }
    keeper.abort();
    let _ = c.lease_revoke(lease).await;
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(RETRY) => {}
    }
}

/// Renews `lease` every third of its life; cancels `lost` once it may have expired on etcd
/// (no renewal came back in time) or etcd says it has. A keep-alive stream that breaks (the
/// etcd member it went to died) is opened again, on whichever member answers, while the lease
/// can still be renewed: losing one etcd member does not cost the leadership.
async fn keep_alive(mut client: Client, lease: i64, lost: CancellationToken) {
    let ttl = Duration::from_secs(LEASE_TTL as u64);
    let mut expires = Instant::now() + ttl;
    let every = ttl / 3;
    'streams: while Instant::now() + STEP_DOWN_MARGIN < expires {
        let deadline = expires.checked_sub(STEP_DOWN_MARGIN).unwrap_or(expires);
        let (mut keeper, mut stream) = match tokio::time::timeout_at(deadline, client.lease_keep_alive(lease)).await {
            Ok(Ok(ks)) => ks,
            Ok(Err(e)) => {
                warn!("etcd: cannot renew the lease, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => break,
        };
        loop {
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                continue 'streams;
            }
            let deadline = expires.checked_sub(STEP_DOWN_MARGIN).unwrap_or(expires);
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => expires = sent + Duration::from_secs(r.ttl() as u64),
                // etcd says the lease is gone.
                Ok(Ok(Some(_))) => break 'streams,
                Ok(_) => continue 'streams,
                Err(_) => break 'streams,
            }
            if Instant::now() + STEP_DOWN_MARGIN >= expires {
                break 'streams;
            }
            tokio::time::sleep_until(sent + every).await;
        }
    }
    lost.cancel();
}

/// Keeps `svc`'s idea of the leader's address current from the election until `stop`.
pub async fn watch_leader(client: Client, root: String, svc: Arc<Service>, stop: CancellationToken) {
    let name = election_name(&root);
    while !stop.is_cancelled() {
        let mut c = client.clone();
        match c.observe(name.clone()).await {
            Ok(mut stream) => loop {
                let m = tokio::select! {
                    m = stream.message() => m,
                    _ = stop.cancelled() => return,
                };
                match m {
                    Ok(Some(r)) => {
                        let addr = r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string);
                        if addr.is_some() && addr != svc.leader_addr() {
                            info!(leader = addr.as_deref().unwrap_or(""), "the leader is");
                        }
                        if addr.is_some() {
                            svc.set_leader_addr(addr);
                        }
                    }
                    _ => break,
                }
            },
            Err(e) => warn!("etcd: cannot observe the election, retrying: {e}"),
        }
        pause(&stop).await;
    }
}

/// Follows the other services' commits until `stop`: reloads the state whenever the store's
/// version key changes (and once at each (re)connection).
pub async fn follow_store(client: Client, version_key: String, svc: Arc<Service>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut c = client.clone();
        match c.watch(version_key.clone(), None).await {
            Ok(mut stream) => {
                refresh(&svc).await;
                loop {
                    let m = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => return,
                    };
                    match m {
                        Ok(Some(r)) if !r.events().is_empty() => refresh(&svc).await,
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            }
            Err(e) => warn!("etcd: cannot watch the store, retrying: {e}"),
        }
        pause(&stop).await;
    }
}

async fn refresh(svc: &Arc<Service>) {
    let s = svc.clone();
    match tokio::task::spawn_blocking(move || s.refresh()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!("cannot reload the state from etcd: {e}"),
        Err(e) => warn!("cannot reload the state from etcd: {e}"),
    }
}
