//! Which node serves which slot, and one multiplexed connection per node.
//!
//! Single node: one [`ConnectionManager`] serving every slot. Cluster: the
//! masters announced by `CLUSTER SLOTS` (asked of a known node, else of a
//! seed), a slot -> master table, and one `ConnectionManager` per master.
//! kvroute routes its own pipelines (one per master) instead of using
//! `redis::cluster_async`, whose pipelines must stay within one slot.
//!
//! Why `ConnectionManager` and not a pool (deadpool-redis): it multiplexes
//! every concurrent batch and lookup over one connection per node, pipelining
//! them on the wire, and reconnects by itself; see `docs/dependencies.md`.

use super::scripts::{self, ScriptSupport};
use crate::Error;
use crate::tls::TlsFiles;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};
use std::time::Duration;

use super::slots::SLOT_COUNT;

/// A connection attempt that takes longer fails (the caller retries or degrades).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds a hung request; lookups are normally answered in well under a millisecond.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Background reconnection attempts of a `ConnectionManager` before a
/// request fails; kept low so a dead node is reported quickly.
const RECONNECT_RETRIES: usize = 2;

/// Marks a slot no master serves (the cluster is incomplete).
const UNSERVED: u16 = u16::MAX;

/// One master and its connection.
pub struct Node {
    /// `host:port`, for messages and for matching nodes across refreshes.
    pub addr: String,
    /// Cheap to clone; clones share the one multiplexed connection.
    pub conn: ConnectionManager,
    /// What the node's scripts allow (found at connect).
    pub scripts: ScriptSupport,
}

/// The nodes and who serves which slot, replaced as a whole on refresh.
pub struct Topology {
    pub nodes: Vec<Node>,
    /// slot -> index into `nodes`; `None`: one node serves every slot.
    owner: Option<Box<[u16]>>,
    /// Bumped by every refresh, so that concurrent failures refresh once.
    pub generation: u64,
}

impl Topology {
    pub fn single(node: Node) -> Self {
        Topology {
            nodes: vec![node],
            owner: None,
            generation: 0,
        }
    }

    /// The node serving `slot`, `None` when no master serves it.
    pub fn node_of(&self, slot: u16) -> Option<usize> {
        match &self.owner {
            None => Some(0),
            Some(owner) => {
                let n = *owner.get(usize::from(slot))?;
                (n != UNSERVED).then_some(usize::from(n))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.owner.is_some()
    }

    /// Every master runs read-only scripts (Redis 7.0 or later).
    pub fn read_only_scripts(&self) -> bool {
        self.nodes.iter().all(|n| n.scripts.read_only)
    }
}

/// Parses a node URL and applies the TLS files; single-node and cluster
/// URLs share this.
pub fn parse_url(url: &str, tls: &TlsFiles) -> Result<ConnectionInfo, Error> {
    let info = url
        .into_connection_info()
        .map_err(|e| Error::Config(format!("invalid Redis URL {}: {e}", redact(url))))?;
    tls.apply(info, url)
}

/// A URL without its password, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// `host:port` of a connection target.
pub fn addr_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => format!("{other:?}"),
    }
}

/// Connects to one node and loads the scripts there.
pub async fn connect_node(info: ConnectionInfo) -> Result<Node, Error> {
    let addr = addr_of(&info);
    let client = redis::Client::open(info)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES);
    let mut conn = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| {
            // A wrong password or an unusable TLS setup does not heal by
            // retrying: say so, so that the binaries exit instead.
            if Error::redis_is_config(&e) {
                Error::Config(format!("cannot connect to {addr}: {e}"))
            } else {
                Error::Topology(format!("cannot connect to {addr}: {e}"))
            }
        })?;
    let scripts = scripts::load_all(&mut conn).await?;
    Ok(Node {
        addr,
        conn,
        scripts,
    })
}

/// The same credentials and TLS settings as `seed`, at another address (a
/// master announced by `CLUSTER SLOTS`).
fn at_address(seed: &ConnectionInfo, host: &str, port: u16) -> Result<ConnectionInfo, Error> {
    let addr = match seed.addr() {
        ConnectionAddr::Tcp(..) => ConnectionAddr::Tcp(host.to_owned(), port),
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        other => {
            return Err(Error::Config(format!(
                "cluster seeds must be TCP addresses, got {other:?}"
            )));
        }
    };
    Ok(seed.clone().set_addr(addr))
}

/// One contiguous range of `CLUSTER SLOTS`.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub host: String,
    pub port: u16,
}

/// Parses a `CLUSTER SLOTS` reply; an empty host means the answering node.
pub fn parse_cluster_slots(reply: &Value, answering_host: &str) -> Result<Vec<SlotRange>, Error> {
    let bad = |what: &str| Error::Reply(format!("CLUSTER SLOTS: {what}"));
    let Value::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad("range is not an array"));
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad("range lacks start, end or master"));
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) if !h.is_empty() => h.clone(),
            _ => answering_host.to_owned(),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(bad("master lacks a port"));
        };
        let in_range = |v: i64| u16::try_from(v).ok().filter(|&s| s < SLOT_COUNT);
        let (Some(start), Some(end), Ok(port)) =
            (in_range(*start), in_range(*end), u16::try_from(*port))
        else {
            return Err(bad("slot or port out of range"));
        };
        out.push(SlotRange {
            start,
            end,
            host,
            port,
        });
    }
    Ok(out)
}

/// Asks one node for the cluster's slot map.
async fn ask_slots(conn: &mut ConnectionManager, host: &str) -> Result<Vec<SlotRange>, Error> {
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let ranges = parse_cluster_slots(&reply, host)?;
    if ranges.is_empty() {
        return Err(Error::Topology(format!(
            "{host} serves no slots (is it a cluster node?)"
        )));
    }
    Ok(ranges)
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Builds a cluster topology: slot map from the first node that answers
/// (known masters first, then seeds), connections reused by address.
pub async fn discover(
    seeds: &[ConnectionInfo],
    previous: Option<&Topology>,
) -> Result<Topology, Error> {
    let mut errors = Vec::new();
    let mut ranges = None;
    if let Some(prev) = previous {
        for node in &prev.nodes {
            match ask_slots(&mut node.conn.clone(), host_of(&node.addr)).await {
                Ok(r) => {
                    ranges = Some(r);
                    break;
                }
                Err(e) => errors.push(format!("{}: {e}", node.addr)),
            }
        }
    }
    // A seed that answered is usually a master too: keep its connection.
    let mut spare: Option<Node> = None;
    if ranges.is_none() {
        for seed in seeds {
            let addr = addr_of(seed);
            let attempt = async {
                let mut node = connect_node(seed.clone()).await?;
                let r = ask_slots(&mut node.conn, host_of(&addr)).await?;
                Ok::<_, Error>((node, r))
            };
            match attempt.await {
                Ok((node, r)) => {
                    spare = Some(node);
                    ranges = Some(r);
                    break;
                }
                // Every seed shares the credentials and TLS settings.
                Err(e) if e.is_config() => return Err(e),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
    }
    let Some(ranges) = ranges else {
        return Err(Error::Topology(format!(
            "no node answered CLUSTER SLOTS: {}",
            errors.join("; ")
        )));
    };
    let seed = seeds
        .first()
        .ok_or_else(|| Error::Config("a cluster needs at least one seed URL".into()))?;
    let mut nodes: Vec<Node> = Vec::new();
    let mut owner = vec![UNSERVED; usize::from(SLOT_COUNT)].into_boxed_slice();
    for range in &ranges {
        let addr = format!("{}:{}", range.host, range.port);
        let index = match nodes.iter().position(|n| n.addr == addr) {
            Some(i) => i,
            None => {
                let reused = previous
                    .into_iter()
                    .flat_map(|p| p.nodes.iter())
                    .chain(spare.as_ref())
                    .find(|n| n.addr == addr);
                let node = match reused {
                    Some(n) => Node {
                        addr: addr.clone(),
                        conn: n.conn.clone(),
                        scripts: n.scripts,
                    },
                    None => connect_node(at_address(seed, &range.host, range.port)?).await?,
                };
                nodes.push(node);
                nodes.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| Error::Topology("too many masters".into()))?;
        for slot in range.start..=range.end {
            owner[usize::from(slot)] = index;
        }
    }
    Ok(Topology {
        nodes,
        owner: Some(owner),
        generation: previous.map_or(0, |p| p.generation + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn cluster_slots_parse_with_empty_host() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("", 7001),
                node("127.0.0.2", 7002),
            ]),
        ]);
        let ranges = parse_cluster_slots(&reply, "127.0.0.9").unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(
            ranges[0],
            SlotRange {
                start: 0,
                end: 5460,
                host: "127.0.0.1".into(),
                port: 7000
            }
        );
        assert_eq!(ranges[1].host, "127.0.0.9");
        assert!(parse_cluster_slots(&Value::Nil, "h").is_err());
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(20000),
            node("h", 1),
        ])]);
        assert!(parse_cluster_slots(&bad, "h").is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
