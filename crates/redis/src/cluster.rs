//! Sends a wave of commands: grouped by the node serving each command's
//! slot, one pipeline per node, all nodes concurrently, replies returned in
//! call order. One wave costs one round trip (the slowest node's).
//!
//! Recovery, bounded to [`MAX_ATTEMPTS`] sends per wave; only the commands
//! that failed are sent again, in their original order, so per-key order is
//! kept (and every command kvroute sends is idempotent, so a resend after a
//! dropped connection is harmless):
//! - NOSCRIPT (Redis restarted or `SCRIPT FLUSH`): SCRIPT LOAD on that node,
//!   resend at once;
//! - MOVED, ASK, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY, LOADING, or a
//!   connection error: re-read the slot map (cluster), short backoff, resend.
//!   ASK is not followed with ASKING: during a migration the resend waits
//!   for the slot to settle, which costs latency, not correctness.

use super::Counters;
use super::scripts;
use super::topology::{self, Topology};
use crate::Error;
use futures::future::join_all;
use parking_lot::RwLock;
use redis::{Cmd, ConnectionInfo, RedisError, Value};
use redis::{ServerError, ServerErrorKind};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Sends per wave before giving up (the caller retries or degrades).
const MAX_ATTEMPTS: u32 = 3;
/// Backoff before a resend that follows a redirect or a connection error.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// One command and the slot it must run in.
pub struct Call {
    pub slot: u16,
    pub cmd: Cmd,
}

/// Replies of a wave, in call order.
pub struct Wave {
    pub replies: Vec<Value>,
    /// Sends it took (1 unless something was recovered).
    pub round_trips: u32,
}

/// Connections to every master and the current slot map.
pub struct Conns {
    topology: RwLock<Arc<Topology>>,
    /// Cluster seeds; empty on a single node (nothing to rediscover).
    seeds: Vec<ConnectionInfo>,
    /// Serialises topology refreshes; concurrent failures refresh once.
    refresh_lock: tokio::sync::Mutex<()>,
    pub counters: Arc<Counters>,
}

/// What to do about a failed command.
enum Recovery {
    Reload,
    Refresh,
}

fn recovery_for_server(err: &ServerError) -> Option<Recovery> {
    match err.kind()? {
        ServerErrorKind::NoScript => Some(Recovery::Reload),
        ServerErrorKind::Moved
        | ServerErrorKind::Ask
        | ServerErrorKind::TryAgain
        | ServerErrorKind::ClusterDown
        | ServerErrorKind::MasterDown
        | ServerErrorKind::ReadOnly
        | ServerErrorKind::BusyLoading => Some(Recovery::Refresh),
        _ => None,
    }
}

fn is_transient(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
}

impl Conns {
    pub fn new(topology: Topology, seeds: Vec<ConnectionInfo>, counters: Arc<Counters>) -> Self {
        Conns {
            topology: RwLock::new(Arc::new(topology)),
            seeds,
            refresh_lock: tokio::sync::Mutex::new(()),
            counters,
        }
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.read().clone()
    }

    /// Runs `calls` as one wave (see the module doc).
    pub async fn run(&self, calls: Vec<Call>) -> Result<Wave, Error> {
        let n = calls.len();
        let mut replies: Vec<Option<Value>> = vec![None; n];
        let (slots, mut cmds): (Vec<u16>, Vec<Option<Cmd>>) =
            calls.into_iter().map(|c| (c.slot, Some(c.cmd))).unzip();
        let mut pending: Vec<usize> = (0..n).collect();
        let mut round_trips = 0;
        let mut last_error: Option<Error> = None;
        while !pending.is_empty() {
            if round_trips == MAX_ATTEMPTS {
                return Err(last_error.unwrap_or_else(|| {
                    Error::Topology(format!("gave up after {MAX_ATTEMPTS} attempts"))
                }));
            }
            let topo = self.topology();
            // Group by node, keeping call order within each node.
            let mut groups: Vec<Vec<usize>> = (0..topo.nodes.len()).map(|_| Vec::new()).collect();
            for &i in &pending {
                let node = topo.node_of(slots[i]).ok_or_else(|| {
                    Error::Topology(format!("no master serves slot {}", slots[i]))
                })?;
                groups[node].push(i);
            }
            let mut sends = Vec::new();
            for (node, idx) in groups
                .into_iter()
                .enumerate()
                .filter(|(_, idx)| !idx.is_empty())
            {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for &i in &idx {
                    // Taken on the first send; `restore` puts back what must be resent.
                    let cmd = cmds[i].take().ok_or_else(|| {
                        Error::Reply(format!("command {i} of the wave went missing"))
                    })?;
                    pipe.add_command(cmd);
                }
                let mut conn = topo.nodes[node].conn.clone();
                sends.push(async move {
                    let result = pipe.query_async::<Vec<Value>>(&mut conn).await;
                    (node, idx, pipe, result)
                });
            }
            let results = join_all(sends).await;
            round_trips += 1;

            let mut retry = Vec::new();
            let mut reload = Vec::new();
            let mut refresh = false;
            for (node, idx, pipe, result) in results {
                let addr = &topo.nodes[node].addr;
                let values = match result {
                    Ok(values) if values.len() == idx.len() => values,
                    Ok(values) => {
                        return Err(Error::Reply(format!(
                            "{addr} answered {} replies to a pipeline of {}",
                            values.len(),
                            idx.len()
                        )));
                    }
                    Err(e) if is_transient(&e) => {
                        tracing::debug!(node = %addr, error = %e, "redis pipeline failed; resending");
                        refresh = true;
                        restore(&mut cmds, &idx, &pipe, |_| true);
                        retry.extend_from_slice(&idx);
                        last_error = Some(e.into());
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut failed = vec![false; idx.len()];
                for (pos, (&i, value)) in idx.iter().zip(values).enumerate() {
                    match value {
                        Value::ServerError(err) => match recovery_for_server(&err) {
                            Some(Recovery::Reload) => {
                                failed[pos] = true;
                                if !reload.contains(&node) {
                                    reload.push(node);
                                }
                            }
                            Some(Recovery::Refresh) => {
                                failed[pos] = true;
                                refresh = true;
                                last_error = Some(RedisError::from(err).into());
                            }
                            None => return Err(RedisError::from(err).into()),
                        },
                        value => replies[i] = Some(value),
                    }
                }
                restore(&mut cmds, &idx, &pipe, |pos| failed[pos]);
                retry.extend(
                    idx.iter()
                        .zip(&failed)
                        .filter(|(_, f)| **f)
                        .map(|(&i, _)| i),
                );
            }
            for node in reload {
                self.counters.noscript_reloads.fetch_add(1, Relaxed);
                let mut conn = topo.nodes[node].conn.clone();
                scripts::load_all(&mut conn).await?;
            }
            if refresh {
                tokio::time::sleep(RETRY_BACKOFF * round_trips).await;
                if topo.is_cluster() {
                    self.refresh(topo.generation).await?;
                }
            }
            retry.sort_unstable();
            pending = retry;
        }
        let replies = replies
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::Reply("a command of the wave got no reply".into())))
            .collect::<Result<_, _>>()?;
        Ok(Wave {
            replies,
            round_trips,
        })
    }

    /// Re-reads the slot map, unless another task already did since `seen`.
    async fn refresh(&self, seen: u64) -> Result<(), Error> {
        let _guard = self.refresh_lock.lock().await;
        let current = self.topology();
        if current.generation != seen {
            return Ok(());
        }
        self.counters.topology_refreshes.fetch_add(1, Relaxed);
        let fresh = topology::discover(&self.seeds, Some(&current)).await?;
        tracing::info!(
            masters = fresh.nodes.len(),
            generation = fresh.generation,
            "redis cluster topology refreshed"
        );
        *self.topology.write() = Arc::new(fresh);
        Ok(())
    }

    /// Sends `cmd` to every master concurrently; replies in node order.
    pub async fn on_every_node(&self, cmd: &Cmd) -> Result<Vec<(String, Value)>, Error> {
        let topo = self.topology();
        let sends = topo.nodes.iter().map(|node| {
            let mut conn = node.conn.clone();
            async move {
                let v: Value = cmd.query_async(&mut conn).await?;
                Ok::<_, Error>((node.addr.clone(), v))
            }
        });
        join_all(sends).await.into_iter().collect()
    }
}

/// Puts back the commands at the positions `keep` selects, for a resend.
fn restore(
    cmds: &mut [Option<Cmd>],
    idx: &[usize],
    pipe: &redis::Pipeline,
    keep: impl Fn(usize) -> bool,
) {
    for (pos, cmd) in pipe.cmd_iter().enumerate() {
        if keep(pos) {
            cmds[idx[pos]] = Some(cmd.clone());
        }
    }
}
