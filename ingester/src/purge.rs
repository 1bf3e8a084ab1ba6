//! Pods whose entries must leave the index although no event says so.
//!
//! An index entry must not outlive the pod's cache by more than a configured
//! time (a stale entry misroutes; a missing one only costs a miss). vLLM says
//! nothing when it goes away, so two rules, each off unless configured, stand
//! in for the missing event:
//!
//! - **gone** (`--purge-after`): a pod last heard over a connect-mode socket
//!   whose endpoint has been out of the `--zmq-connect` set (a DNS name no
//!   longer resolving to it, a replica shard moving) for this long. The
//!   endpoint the batches came from decides, not the pod id in the topic, so a
//!   pod that names itself differently from the address we dial is never
//!   mistaken for gone. Pods heard only in bind mode are never "gone": there
//!   is no set for them to leave.
//! - **silent** (`--purge-silent-after`): a pod that gave no sign of life
//!   for this long. vLLM publishes only when its cache changes and sends no
//!   heartbeat. In connect mode the ingester's connection to the pod is the
//!   sign of life: a pod counts as heard while its socket is connected, so
//!   only a pod both silent and unreachable for this long is purged (an idle
//!   pod keeps its entries). In bind mode the pods dial us and ZeroMQ does
//!   not say which connection carried which topic, so published batches are
//!   the only signal and an *idle* pod is silent too: its entries go, and
//!   come back only as it stores blocks again. That costs cache misses, never
//!   a misroute; set the time above the longest idle period worth routing for.
//!
//! Automatic purges clear the pod and the data-parallel ranks this process
//! saw (the workers expand the endpoint), not every rank found in Redis: a
//! rank publishing to another ingester replica is not silent just because
//! this one has not heard it. The operator's purges (CLI, admin API) do clear
//! every rank registered in Redis.

use crate::metrics as m;
use crate::pipeline::Purger;
use crate::socket::SocketStats;
use kvroute_core::ids::PodId;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a pod's batches reached us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The bound SUB (the pod dialed us).
    Bind,
    /// A connect-mode socket to this endpoint (`tcp://127.0.0.5:5557`).
    Connect(String),
}

impl Via {
    /// From a [`crate::socket::RawBatch::source`] (`connect:<endpoint>`,
    /// `bind:<endpoints>`).
    pub fn from_source(source: &str) -> Via {
        match source.strip_prefix("connect:") {
            Some(endpoint) => Via::Connect(endpoint.to_owned()),
            None => Via::Bind,
        }
    }
}

/// When and how a pod was last heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub at: Instant,
    pub via: Via,
}

/// Pods heard, by the pod id in their topic (without a data-parallel rank):
/// written by the workers per message (where its topic is parsed), read by
/// the sweeper.
#[derive(Debug, Clone, Default)]
pub struct LastHeard(Arc<Mutex<HashMap<String, Heard>>>);

impl LastHeard {
    /// Records a message of `pod` read from `source`.
    pub fn record(&self, pod: &str, source: &str, at: Instant) {
        let mut map = self.0.lock();
        match map.get_mut(pod) {
            Some(h) => {
                h.at = at;
                if !matches!(&h.via, Via::Connect(e) if source.strip_prefix("connect:") == Some(e))
                {
                    h.via = Via::from_source(source);
                }
            }
            None => {
                map.insert(
                    pod.to_owned(),
                    Heard {
                        at,
                        via: Via::from_source(source),
                    },
                );
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, Heard)> {
        self.0
            .lock()
            .iter()
            .map(|(p, h)| (p.clone(), h.clone()))
            .collect()
    }

    /// Forgets `pod` unless it was heard after `seen` (it spoke again while
    /// being purged: keep tracking it).
    fn forget(&self, pod: &str, seen: Instant) {
        let mut map = self.0.lock();
        if map.get(pod).is_some_and(|h| h.at <= seen) {
            map.remove(pod);
        }
    }
}

/// Why a pod is purged (the `reason` label of the purge counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Gone,
    Silent,
}

impl Reason {
    pub fn as_label(self) -> &'static str {
        match self {
            Reason::Gone => "gone",
            Reason::Silent => "silent",
        }
    }
}

/// Both rules' times (`None`: the rule is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgePolicy {
    pub gone_after: Option<Duration>,
    pub silent_after: Option<Duration>,
}

impl PurgePolicy {
    pub fn is_enabled(&self) -> bool {
        self.gone_after.is_some() || self.silent_after.is_some()
    }

    /// How often to sweep: a quarter of the shortest time, so a purge lands
    /// at most 25% late, between 50 ms and 5 s.
    pub fn tick(&self) -> Duration {
        [self.gone_after, self.silent_after]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(5), |d| d / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The decisions, apart from the clock and the channels (unit-tested).
#[derive(Debug, Default)]
pub struct Sweeper {
    policy: PurgePolicy,
    /// Per pod: since when its connect endpoint has been out of the set.
    gone_since: HashMap<String, Instant>,
    /// Per connect-mode pod: the last sweep that found its socket connected.
    alive_at: HashMap<String, Instant>,
}

impl Sweeper {
    pub fn new(policy: PurgePolicy) -> Self {
        Sweeper {
            policy,
            gone_since: HashMap::new(),
            alive_at: HashMap::new(),
        }
    }

    /// The pods to purge now. `live` is the connect set (`None`: no connect
    /// mode, so nothing can be gone); `connected` says whether the
    /// connect-mode socket to an endpoint is connected now.
    pub fn sweep(
        &mut self,
        heard: &[(String, Heard)],
        live: Option<&BTreeSet<String>>,
        connected: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<(String, Reason)> {
        let tracked = |pod: &String| heard.iter().any(|(p, _)| p == pod);
        self.gone_since.retain(|pod, _| tracked(pod));
        self.alive_at.retain(|pod, _| tracked(pod));
        let mut out = Vec::new();
        for (pod, h) in heard {
            if let Via::Connect(e) = &h.via
                && connected(e)
            {
                self.alive_at.insert(pod.clone(), now);
            }
            let last = self.alive_at.get(pod).map_or(h.at, |a| (*a).max(h.at));
            if let Some(after) = self.policy.silent_after
                && now.saturating_duration_since(last) >= after
            {
                self.gone_since.remove(pod);
                self.alive_at.remove(pod);
                out.push((pod.clone(), Reason::Silent));
                continue;
            }
            let (Some(after), Some(live), Via::Connect(endpoint)) =
                (self.policy.gone_after, live, &h.via)
            else {
                self.gone_since.remove(pod);
                continue;
            };
            if live.contains(endpoint) {
                self.gone_since.remove(pod);
                continue;
            }
            let since = *self.gone_since.entry(pod.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= after {
                self.gone_since.remove(pod);
                out.push((pod.clone(), Reason::Gone));
            }
        }
        out
    }
}

/// Sweeps every [`PurgePolicy::tick`] until `shutdown`, purging through the
/// workers (in order with the pod's pending batches).
pub fn spawn(
    policy: PurgePolicy,
    heard: LastHeard,
    targets: Option<watch::Receiver<BTreeSet<String>>>,
    sockets: Arc<SocketStats>,
    purger: Purger,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut sweeper = Sweeper::new(policy);
        let every = policy.tick();
        tracing::info!(?policy, ?every, "pod purge rules active");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let snapshot = heard.snapshot();
            let live = targets.as_ref().map(|t| t.borrow().clone());
            let now = Instant::now();
            let connected = |e: &str| sockets.is_connected(e);
            for (pod, reason) in sweeper.sweep(&snapshot, live.as_ref(), connected, now) {
                let last = snapshot
                    .iter()
                    .find(|(p, _)| *p == pod)
                    .map_or(now, |(_, h)| h.at);
                tracing::info!(
                    %pod,
                    reason = reason.as_label(),
                    silent_for = ?now.saturating_duration_since(last),
                    "purging pod"
                );
                metrics::counter!(m::PURGES, "reason" => reason.as_label()).increment(1);
                purger.purge(&PodId::new(&pod)).await;
                heard.forget(&pod, last);
            }
        }
        tracing::debug!("pod purge sweeper stopped: shutdown");
    });
}

/// The pods an operator's purge of `target` clears: `target` itself and,
/// when it names an endpoint without a rank, every data-parallel rank of
/// that endpoint in `known` (the registry in Redis), so ranks this process
/// never heard go too.
pub fn with_ranks(target: &PodId, known: &[PodId]) -> Vec<PodId> {
    let mut out = vec![target.clone()];
    if target.dp_rank().is_none() {
        out.extend(
            known
                .iter()
                .filter(|p| p.dp_rank().is_some() && p.endpoint() == target.as_str())
                .cloned(),
        );
    }
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    out
}

/// An operator's purge of one pod id, resolved against the index: every
/// pod it clears with the entries each holds now, and whether the id named
/// anything at all (registered in `kvroute:pods`, or holding entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeTargets {
    pub pods: Vec<(PodId, u64)>,
    pub matched: bool,
}

impl PurgeTargets {
    /// Entries over every target.
    pub fn entries(&self) -> u64 {
        self.pods.iter().map(|(_, n)| n).sum()
    }
}

/// Resolves `pod` (and, without a rank, every rank of that endpoint in
/// `known`) with each target's entries. An id that matches nothing (a typo)
/// comes back with `matched == false`: purging it would report success and
/// clear nothing.
pub async fn resolve(
    index: &kvroute_redis::AnyIndex,
    pod: &PodId,
    known: &[PodId],
) -> Result<PurgeTargets, kvroute_core::index::IndexError> {
    let mut pods = Vec::new();
    let mut matched = false;
    for t in with_ranks(pod, known) {
        let n = index.pod_entries(&t).await?;
        matched |= n > 0 || known.contains(&t);
        pods.push((t, n));
    }
    Ok(PurgeTargets { pods, matched })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// No connect-mode socket is connected.
    fn no(_: &str) -> bool {
        false
    }

    fn heard(pod: &str, at: Instant, via: Via) -> (String, Heard) {
        (pod.to_owned(), Heard { at, via })
    }

    #[test]
    fn via_from_source() {
        assert_eq!(
            Via::from_source("connect:tcp://127.0.0.5:5557"),
            Via::Connect("tcp://127.0.0.5:5557".into())
        );
        assert_eq!(Via::from_source("bind:tcp://127.0.0.1:5557"), Via::Bind);
    }

    #[test]
    fn silent_pods_go_after_the_time_in_either_mode() {
        let t0 = Instant::now();
        let mut s = Sweeper::new(PurgePolicy {
            gone_after: None,
            silent_after: Some(10 * S),
        });
        let h = vec![
            heard("127.0.0.11:8000", t0, Via::Bind),
            heard("127.0.0.12:8000", t0 + 5 * S, Via::Bind),
            heard(
                "127.0.0.13:8000",
                t0,
                Via::Connect("tcp://127.0.0.13:5557".into()),
            ),
        ];
        assert!(s.sweep(&h, None, no, t0 + 9 * S).is_empty());
        let mut got = s.sweep(&h, None, no, t0 + 10 * S);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("127.0.0.11:8000".into(), Reason::Silent),
                ("127.0.0.13:8000".into(), Reason::Silent)
            ]
        );
    }

    #[test]
    fn a_connected_connect_mode_pod_is_not_silent_until_it_disconnects() {
        let t0 = Instant::now();
        let mut s = Sweeper::new(PurgePolicy {
            gone_after: None,
            silent_after: Some(10 * S),
        });
        let e = "tcp://127.0.0.14:5557";
        let h = vec![
            heard("127.0.0.14:8000", t0, Via::Connect(e.into())),
            heard("127.0.0.15:8000", t0, Via::Bind),
        ];
        let up = |x: &str| x == e;
        // Idle but connected: kept; the bind-mode pod has only its batches.
        assert_eq!(
            s.sweep(&h, None, up, t0 + 30 * S),
            vec![("127.0.0.15:8000".into(), Reason::Silent)]
        );
        let h = &h[..1];
        // Disconnected from t0+30: silent counts from there.
        assert!(s.sweep(h, None, no, t0 + 39 * S).is_empty());
        assert_eq!(
            s.sweep(h, None, no, t0 + 40 * S),
            vec![("127.0.0.14:8000".into(), Reason::Silent)]
        );
    }

    #[test]
    fn gone_counts_from_leaving_the_connect_set_and_ignores_bind_pods() {
        let t0 = Instant::now();
        let mut s = Sweeper::new(PurgePolicy {
            gone_after: Some(10 * S),
            silent_after: None,
        });
        let a = "tcp://127.0.0.21:5557".to_string();
        let h = vec![
            heard("127.0.0.21:8000", t0, Via::Connect(a.clone())),
            heard("127.0.0.22:8000", t0, Via::Bind),
        ];
        let with_a: BTreeSet<String> = [a.clone()].into();
        let without: BTreeSet<String> = BTreeSet::new();
        // In the set, however long silent: kept (silence is not this rule).
        assert!(s.sweep(&h, Some(&with_a), no, t0 + 100 * S).is_empty());
        // Out of the set from t0+100: purged 10 s later, not before.
        assert!(s.sweep(&h, Some(&without), no, t0 + 100 * S).is_empty());
        assert!(s.sweep(&h, Some(&without), no, t0 + 109 * S).is_empty());
        // Back in the set resets the clock.
        assert!(s.sweep(&h, Some(&with_a), no, t0 + 109 * S).is_empty());
        assert!(s.sweep(&h, Some(&without), no, t0 + 115 * S).is_empty());
        assert_eq!(
            s.sweep(&h, Some(&without), no, t0 + 125 * S),
            vec![("127.0.0.21:8000".into(), Reason::Gone)]
        );
        // Without connect mode nothing is ever gone.
        let mut s = Sweeper::new(PurgePolicy {
            gone_after: Some(S),
            silent_after: None,
        });
        assert!(s.sweep(&h, None, no, t0 + 1000 * S).is_empty());
    }

    #[test]
    fn forgetting_keeps_a_pod_that_spoke_meanwhile() {
        let t0 = Instant::now();
        let heard = LastHeard::default();
        heard.record("127.0.0.31:8000", "bind:tcp://127.0.0.1:5557", t0);
        heard.record("127.0.0.31:8000", "bind:tcp://127.0.0.1:5557", t0 + S);
        heard.forget("127.0.0.31:8000", t0);
        assert_eq!(heard.snapshot().len(), 1);
        heard.forget("127.0.0.31:8000", t0 + S);
        assert!(heard.snapshot().is_empty());
        heard.record("127.0.0.32:8000", "connect:tcp://127.0.0.32:5557", t0);
        assert_eq!(
            heard.snapshot()[0].1.via,
            Via::Connect("tcp://127.0.0.32:5557".into())
        );
    }

    #[test]
    fn tick_is_a_quarter_of_the_shortest_time_within_bounds() {
        let p = |g: Option<u64>, s: Option<u64>| PurgePolicy {
            gone_after: g.map(Duration::from_millis),
            silent_after: s.map(Duration::from_millis),
        };
        assert_eq!(p(Some(1000), Some(400)).tick(), Duration::from_millis(100));
        assert_eq!(p(Some(40), None).tick(), Duration::from_millis(50));
        assert_eq!(p(None, Some(3_600_000)).tick(), Duration::from_secs(5));
        assert!(!p(None, None).is_enabled());
    }

    #[test]
    fn operator_purges_expand_to_every_registered_rank() {
        let known: Vec<PodId> = [
            "127.0.0.41:8000",
            "127.0.0.41:8000#dp0",
            "127.0.0.41:8000#dp3",
            "127.0.0.41:80#dp1",
            "127.0.0.42:8000#dp0",
        ]
        .iter()
        .map(PodId::new)
        .collect();
        let ids = |v: Vec<PodId>| v.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(
            ids(with_ranks(&PodId::new("127.0.0.41:8000"), &known)),
            [
                "127.0.0.41:8000",
                "127.0.0.41:8000#dp0",
                "127.0.0.41:8000#dp3"
            ]
        );
        // A rank names one cache only; an unknown endpoint is still cleared.
        assert_eq!(
            ids(with_ranks(&PodId::new("127.0.0.41:8000#dp3"), &known)),
            ["127.0.0.41:8000#dp3"]
        );
        assert_eq!(
            ids(with_ranks(&PodId::new("127.0.0.43:8000"), &known)),
            ["127.0.0.43:8000"]
        );
    }
}
