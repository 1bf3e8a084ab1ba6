//! Connect mode's endpoint set: which publishers this replica dials.
//!
//! Targets are `tcp://HOST:PORT`. An IP address is taken as is; a DNS name is
//! re-resolved every `refresh` (`tokio::net::lookup_host`), so a Kubernetes
//! headless Service name yields every ready pod and follows the fleet as it
//! scales. The resolved endpoints are then sharded across ingester replicas:
//! with `replicas = N`, replica `i` takes the endpoints whose FNV-1a 64 hash
//! (of the `tcp://IP:PORT` text) modulo N is `i`, so every publisher has
//! exactly one owner with no coordination, and a replica's share changes only
//! when endpoints come or go. The current set is published on a
//! `tokio::sync::watch` that the socket supervisor follows
//! ([`crate::socket::run_connect`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Failed lookups in a row during which a name keeps its last addresses.
/// A DNS outage must not close every socket at once; a name that is really
/// gone (a headless Service scaled to zero answers NXDOMAIN) is dropped
/// after this many refreshes.
pub const STALE_LOOKUPS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("endpoint {0:?}: expected tcp://HOST:PORT")]
    Syntax(String),
    #[error("endpoint {0:?}: the port must be a number in 1..=65535")]
    Port(String),
    #[error("endpoint {0:?}: a wildcard host can only be bound, not dialed")]
    Wildcard(String),
    #[error("replica ordinal {ordinal} is not below the replica count {replicas}")]
    Ordinal { ordinal: u32, replicas: u32 },
}

/// One configured publisher target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A literal address.
    Addr(SocketAddr),
    /// A name to resolve (every address it resolves to is a publisher).
    Dns { host: String, port: u16 },
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, TargetError> {
        let syntax = || TargetError::Syntax(s.to_owned());
        let rest = s.trim().strip_prefix("tcp://").ok_or_else(syntax)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(syntax)?;
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(TargetError::Port(s.to_owned())),
        };
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        // An IPv6 address must be bracketed: `fd00::5:5557` is ambiguous.
        let bracketed = bare.len() != host.len();
        if bare.is_empty() || bare.contains(['/', '@', ' ']) || (!bracketed && bare.contains(':')) {
            return Err(syntax());
        }
        if matches!(bare, "*" | "0.0.0.0" | "::") {
            return Err(TargetError::Wildcard(s.to_owned()));
        }
        match bare.parse::<IpAddr>() {
            Ok(ip) => Ok(Target::Addr(SocketAddr::new(ip, port))),
            Err(_) if bracketed => Err(syntax()),
            Err(_) => Ok(Target::Dns {
                host: bare.to_owned(),
                port,
            }),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => f.write_str(&endpoint(*a)),
            Target::Dns { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// The ZeroMQ endpoint text of an address: `tcp://127.0.0.5:5557`,
/// `tcp://[fd00::5]:5557`. Sharding hashes exactly this text.
pub fn endpoint(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// FNV-1a 64 of a string's bytes (the same function the pipeline shards
/// topics with): stable across processes, versions and replicas.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// This replica's share of the publishers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    replicas: u32,
    ordinal: u32,
}

impl Shard {
    /// Everything (a single replica).
    pub const ALL: Shard = Shard {
        replicas: 1,
        ordinal: 0,
    };

    /// Replica `ordinal` (0-based) of `replicas`; `replicas = 0` is read as 1.
    pub fn new(replicas: u32, ordinal: u32) -> Result<Self, TargetError> {
        let replicas = replicas.max(1);
        if ordinal >= replicas {
            return Err(TargetError::Ordinal { ordinal, replicas });
        }
        Ok(Shard { replicas, ordinal })
    }

    /// Whether this replica dials `endpoint`.
    pub fn owns(&self, endpoint: &str) -> bool {
        fnv1a64(endpoint) % u64::from(self.replicas) == u64::from(self.ordinal)
    }

    /// The endpoints this replica owns.
    pub fn filter<I, S>(&self, endpoints: I) -> BTreeSet<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        endpoints
            .into_iter()
            .map(Into::into)
            .filter(|e| self.owns(e))
            .collect()
    }
}

/// Resolves targets and keeps the last good answer of each name.
#[derive(Debug)]
pub struct Discovery {
    targets: Vec<Target>,
    shard: Shard,
    refresh: Duration,
    /// Per name: last addresses and failed lookups since.
    last: HashMap<String, (Vec<SocketAddr>, u32)>,
}

impl Discovery {
    pub fn new(targets: Vec<Target>, shard: Shard, refresh: Duration) -> Self {
        Discovery {
            targets,
            shard,
            refresh,
            last: HashMap::new(),
        }
    }

    /// Parses `--zmq-connect` values.
    pub fn parse(targets: &[String]) -> Result<Vec<Target>, TargetError> {
        targets.iter().map(|t| t.parse()).collect()
    }

    /// One resolution pass: every target's endpoints, sharded.
    pub async fn resolve(&mut self) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for target in &self.targets {
            match target {
                Target::Addr(a) => {
                    all.insert(endpoint(*a));
                }
                Target::Dns { host, port } => {
                    let key = format!("{host}:{port}");
                    let addrs = match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(found) => {
                            let addrs = one_family(found.collect());
                            self.last.insert(key, (addrs.clone(), 0));
                            addrs
                        }
                        Err(error) => {
                            let entry = self.last.entry(key).or_default();
                            entry.1 += 1;
                            if entry.1 > STALE_LOOKUPS {
                                tracing::warn!(%host, %error, failures = entry.1, "lookup keeps failing; dropping the name's endpoints");
                                entry.0.clear();
                            } else {
                                tracing::warn!(%host, %error, failures = entry.1, kept = entry.0.len(), "lookup failed; keeping the last addresses");
                            }
                            entry.0.clone()
                        }
                    };
                    all.extend(addrs.into_iter().map(endpoint));
                }
            }
        }
        self.shard.filter(all)
    }

    /// Resolves once, then keeps re-resolving in a spawned task (until
    /// `shutdown`); returns the watch the socket supervisor follows.
    pub async fn start(mut self, shutdown: CancellationToken) -> watch::Receiver<BTreeSet<String>> {
        let initial = self.resolve().await;
        tracing::info!(endpoints = initial.len(), shard = ?self.shard, "publisher endpoints resolved");
        let (tx, rx) = watch::channel(initial);
        tokio::spawn(self.run(tx, shutdown));
        rx
    }

    /// Re-resolves every `refresh` and publishes the set when it changed,
    /// until `shutdown` or until nobody watches any more.
    pub async fn run(mut self, tx: watch::Sender<BTreeSet<String>>, shutdown: CancellationToken) {
        let has_names = self.targets.iter().any(|t| matches!(t, Target::Dns { .. }));
        let every = self.refresh.max(Duration::from_millis(100));
        // The first pass is the caller's (see `start`): tick from then on.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break "shutdown",
                _ = tx.closed() => break "no receiver left",
                _ = tick.tick(), if has_names => {
                    let set = self.resolve().await;
                    tx.send_if_modified(|current| {
                        if *current == set {
                            return false;
                        }
                        let added = set.difference(current).count();
                        let removed = current.difference(&set).count();
                        tracing::info!(endpoints = set.len(), added, removed, "publisher endpoint set changed");
                        *current = set;
                        true
                    });
                }
            }
        };
        tracing::info!(reason = why, "endpoint discovery stopped");
    }
}

/// Keeps the IPv4 addresses when a name resolves to both families: a
/// dual-stack pod has one A and one AAAA record, and dialing both would
/// receive its events twice.
fn one_family(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.iter().any(SocketAddr::is_ipv4) {
        addrs.retain(SocketAddr::is_ipv4);
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t: Target = "tcp://127.0.0.5:5557".parse().expect("addr");
        assert_eq!(t, Target::Addr("127.0.0.5:5557".parse().expect("sa")));
        assert_eq!(t.to_string(), "tcp://127.0.0.5:5557");
        let t: Target = "tcp://[fd00::5]:5557".parse().expect("v6");
        assert_eq!(t.to_string(), "tcp://[fd00::5]:5557");
        let t: Target = "tcp://vllm-headless.ns.svc:5557".parse().expect("dns");
        assert_eq!(
            t,
            Target::Dns {
                host: "vllm-headless.ns.svc".into(),
                port: 5557
            }
        );
        use TargetError::*;
        let err = |s: &str| s.parse::<Target>().expect_err(s);
        assert!(matches!(err("127.0.0.5:5557"), Syntax(_)));
        assert!(matches!(err("tcp://127.0.0.5"), Syntax(_)));
        assert!(matches!(err("tcp://:5557"), Syntax(_)));
        assert!(matches!(err("tcp://fd00::5:5557"), Syntax(_)));
        assert!(matches!(err("tcp://a/b:5557"), Syntax(_)));
        assert!(matches!(err("tcp://host:0"), Port(_)));
        assert!(matches!(err("tcp://host:65536"), Port(_)));
        assert!(matches!(err("tcp://host:x"), Port(_)));
        assert!(matches!(err("tcp://*:5557"), Wildcard(_)));
        assert!(matches!(err("tcp://0.0.0.0:5557"), Wildcard(_)));
    }

    #[test]
    fn every_endpoint_has_exactly_one_owner() {
        let endpoints: Vec<String> = (0..500)
            .map(|i| {
                format!(
                    "tcp://127.{}.{}.{}:5557",
                    i / 65536,
                    (i / 256) % 256,
                    i % 256
                )
            })
            .collect();
        for replicas in 1..=7u32 {
            let shards: Vec<BTreeSet<String>> = (0..replicas)
                .map(|i| {
                    Shard::new(replicas, i)
                        .expect("shard")
                        .filter(endpoints.iter().cloned())
                })
                .collect();
            for e in &endpoints {
                let owners = shards.iter().filter(|s| s.contains(e)).count();
                assert_eq!(owners, 1, "{e} with {replicas} replicas");
            }
            // Roughly even: no replica gets more than twice its fair share.
            let fair = endpoints.len() / replicas as usize;
            assert!(shards.iter().all(|s| s.len() <= 2 * fair), "{replicas}");
        }
    }

    #[test]
    fn sharding_is_fnv1a_of_the_endpoint_text() {
        // FNV-1a 64 reference values.
        assert_eq!(fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64("a"), 0xaf63dc4c8601ec8c);
        let e = "tcp://127.0.0.5:5557";
        let owner = (fnv1a64(e) % 3) as u32;
        assert!(Shard::new(3, owner).expect("shard").owns(e));
        assert!(!Shard::new(3, (owner + 1) % 3).expect("shard").owns(e));
        assert!(Shard::ALL.owns(e));
        assert_eq!(Shard::new(0, 0), Ok(Shard::ALL));
        assert!(matches!(Shard::new(2, 2), Err(TargetError::Ordinal { .. })));
    }

    #[test]
    fn dual_stack_names_keep_ipv4() {
        let v4: SocketAddr = "127.0.0.1:5557".parse().expect("v4");
        let v6: SocketAddr = "[::1]:5557".parse().expect("v6");
        assert_eq!(one_family(vec![v6, v4, v4]), vec![v4]);
        assert_eq!(one_family(vec![v6]), vec![v6]);
    }

    #[tokio::test]
    async fn resolves_names_and_publishes_changes() {
        let targets =
            Discovery::parse(&["tcp://localhost:5557".into(), "tcp://127.0.0.9:5558".into()])
                .expect("targets");
        let mut d = Discovery::new(targets, Shard::ALL, Duration::from_millis(100));
        let set = d.resolve().await;
        assert!(set.contains("tcp://127.0.0.1:5557"), "{set:?}");
        assert!(set.contains("tcp://127.0.0.9:5558"), "{set:?}");

        // A run publishes only changes: start from a different set.
        let (tx, mut rx) = watch::channel(BTreeSet::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(d.run(tx, stop.clone()));
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("published in time")
            .expect("sender alive");
        assert_eq!(*rx.borrow_and_update(), set);
        stop.cancel();
        task.await.expect("task");
    }
}
