//! Live mode's simulated vLLM pods: N pods in one process, each an
//! OpenAI-compatible HTTP server on its own loopback address, a simulated
//! engine ([`kvroute_sim::engine::Engine`]) stepping at wall-clock speed, a
//! KV-event PUB socket and a replay ROUTER, as a real vLLM pod with
//! `--kv-events-config` presents itself to kvroute.
//!
//! Each pod runs three tasks: the HTTP server ([`http`]), the engine task
//! ([`stepper`], which also publishes), and the replay server
//! ([`events::serve_replay`]). They share the pod's engine behind one
//! mutex, held only for a submit, a step's scheduling, a metrics render or
//! a [`Fleet::with_engine`] read, never across an await. Idle pods cost
//! nothing: the engine task waits on a `Notify` until a request arrives.

mod events;
mod http;
mod stepper;
mod tracker;

#[cfg(test)]
mod tests;

use anyhow::Context;
use kvroute_core::events::Encoding;
use kvroute_core::keys::KeyScheme;
use kvroute_sim::engine::{Engine, EngineConfig};
use kvroute_tokens::Tokenizer;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{Endpoint, PubSocket, RouterSocket, Socket};

/// The response header naming the pod that answered (`<ip>:<port>`), so a
/// client behind a router can count each pod's share.
pub const POD_HEADER: &str = "x-kvroute-pod";

/// vLLM's default replay buffer (`buffer_steps`).
pub const DEFAULT_REPLAY_BUFFER_STEPS: usize = 10_000;

/// How long [`Fleet::shutdown`] lets HTTP servers finish their open
/// connections before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One pod to start.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// The pod's position in the fleet.
    pub index: usize,
    /// The OpenAI API (`127.0.0.{11+i}:8000`); port 0 takes a free one.
    pub http: SocketAddr,
    /// The KV-event PUB socket (bound, as vLLM's default `tcp://*:5557`).
    pub kv_pub: SocketAddr,
    /// The replay ROUTER socket (bound, `:5558`).
    pub replay: SocketAddr,
    /// The served model name: the API's `model`, the metrics' label and the
    /// topic's model.
    pub model: String,
    pub encoding: Encoding,
    /// The engine; its `model_name` is replaced by `model`.
    pub engine: EngineConfig,
    /// Batches the replay socket keeps (vLLM's `buffer_steps`, 10,000).
    pub replay_buffer_steps: usize,
}

/// The addresses a pod actually bound (ports resolved when the spec said 0).
#[derive(Debug, Clone)]
pub struct PodAddrs {
    pub http: SocketAddr,
    pub kv_pub: SocketAddr,
    pub replay: SocketAddr,
    /// `kv@<http ip:port>@<model>`.
    pub topic: String,
}

/// A pod's pacing and publishing counters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PodStats {
    /// Engine steps run.
    pub steps: u64,
    /// KV-event batches published (the next seq).
    pub batches: u64,
    /// Steps that ended later than their computed end without sleeping at
    /// all (the machine is too slow for the simulated GPU).
    pub late_steps: u64,
    /// Wall-clock lag of step ends behind their computed ends (timer slack
    /// included): mean and worst, seconds.
    pub mean_lag_s: f64,
    pub max_lag_s: f64,
}

/// The engines' clock: seconds since the fleet started.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The instant of engine time `t` (the start for a negative or
    /// non-finite `t`, so a bad step time never parks a pod forever).
    fn at(&self, t: f64) -> Instant {
        let d = Duration::try_from_secs_f64(t).unwrap_or(Duration::ZERO);
        self.start.checked_add(d).unwrap_or(self.start)
    }
}

#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    batches: AtomicU64,
    late_steps: AtomicU64,
    lag_total_us: AtomicU64,
    lag_max_us: AtomicU64,
}

/// What the pod's mutex guards: the engine and who waits on it.
struct Core {
    engine: Engine,
    tracker: tracker::Tracker,
}

/// A pod's shared state.
struct Pod {
    index: usize,
    /// `<ip>:<port>` of the HTTP server: the pod id of the topic and of
    /// [`POD_HEADER`].
    id: String,
    model: String,
    core: Mutex<Core>,
    wake: Notify,
    next_id: AtomicU64,
    clock: Clock,
    tokenizer: Arc<Tokenizer>,
    scheme: KeyScheme,
    block_size: usize,
    capacity_blocks: usize,
    /// Unix seconds at start (the `created` of responses).
    created: u64,
    stats: Counters,
}

/// Locks a mutex, ignoring poisoning (a panicked holder left the engine in
/// a state as good as any: it never panics mid-update by contract).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Running {
    pod: Arc<Pod>,
    addrs: PodAddrs,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<()>,
}

/// N simulated vLLM pods in this process.
pub struct Fleet {
    pods: Vec<Running>,
    clock: Clock,
    stop: CancellationToken,
}

fn tcp_endpoint(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// The address a zeromq bind resolved to.
fn bound_addr(ep: &Endpoint, asked: SocketAddr) -> SocketAddr {
    match ep {
        Endpoint::Tcp(_, port) => SocketAddr::new(asked.ip(), *port),
        _ => asked,
    }
}

impl Fleet {
    /// Binds every pod's three sockets and starts its tasks. Fails (with
    /// every started pod stopped) if any address cannot be bound.
    pub async fn start(specs: Vec<PodSpec>, tokenizer: Arc<Tokenizer>) -> anyhow::Result<Fleet> {
        let clock = Clock {
            start: Instant::now(),
        };
        let mut fleet = Fleet {
            pods: Vec::with_capacity(specs.len()),
            clock,
            stop: CancellationToken::new(),
        };
        for spec in specs {
            match fleet.start_pod(spec, tokenizer.clone()).await {
                Ok(running) => fleet.pods.push(running),
                Err(e) => {
                    fleet.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(fleet)
    }

    async fn start_pod(&self, spec: PodSpec, tokenizer: Arc<Tokenizer>) -> anyhow::Result<Running> {
        let i = spec.index;
        let listener = tokio::net::TcpListener::bind(spec.http)
            .await
            .with_context(|| format!("pod {i}: bind HTTP {}", spec.http))?;
        let http = listener.local_addr()?;
        let mut pub_socket = PubSocket::new();
        let ep = pub_socket
            .bind(&tcp_endpoint(spec.kv_pub))
            .await
            .with_context(|| format!("pod {i}: bind KV events {}", spec.kv_pub))?;
        let kv_pub = bound_addr(&ep, spec.kv_pub);
        let mut router = RouterSocket::new();
        let ep = router
            .bind(&tcp_endpoint(spec.replay))
            .await
            .with_context(|| format!("pod {i}: bind replay {}", spec.replay))?;
        let replay = bound_addr(&ep, spec.replay);
        let id = http.to_string();
        let topic = format!("kv@{id}@{}", spec.model);

        let mut config = spec.engine;
        config.model_name = spec.model.clone();
        let scheme = config.scheme.clone();
        let engine = Engine::new(config);
        let (block_size, capacity_blocks) = (engine.config().block_size, engine.cache().capacity());
        let pod = Arc::new(Pod {
            index: i,
            id,
            model: spec.model,
            core: Mutex::new(Core {
                engine,
                tracker: tracker::Tracker::default(),
            }),
            wake: Notify::new(),
            next_id: AtomicU64::new(0),
            clock: self.clock,
            tokenizer,
            scheme,
            block_size,
            capacity_blocks,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            stats: Counters::default(),
        });

        let ring = Arc::new(events::Ring::new(spec.replay_buffer_steps));
        let publisher = events::Publisher::new(pub_socket, &topic, spec.encoding, ring.clone());
        let stop = self.stop.child_token();
        let tasks = vec![
            tokio::spawn(stepper::run(pod.clone(), publisher, stop.clone())),
            tokio::spawn(events::serve_replay(
                router,
                ring,
                topic.clone(),
                spec.encoding,
                stop.clone(),
            )),
        ];
        let app = http::router(pod.clone());
        let server = tokio::spawn(async move {
            // Every token's SSE chunk is a small write: without TCP_NODELAY
            // Nagle holds one behind the peer's delayed ACK (~40 ms), which
            // uvicorn (vLLM's server) avoids by setting it too.
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY on a pod connection");
                }
            });
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(pod = i, error = %e, "pod HTTP server failed");
            }
        });
        Ok(Running {
            pod,
            addrs: PodAddrs {
                http,
                kv_pub,
                replay,
                topic,
            },
            tasks,
            server,
        })
    }

    pub fn pods(&self) -> usize {
        self.pods.len()
    }

    /// The addresses pod `pod` bound. Panics if `pod >= self.pods()`.
    pub fn addrs(&self, pod: usize) -> &PodAddrs {
        &self.pods[pod].addrs
    }

    /// Read-only access to a pod's engine (index fidelity sampling reads
    /// the true cache). It shows the state after the last step was
    /// scheduled, which may be up to one step ahead of the events
    /// published. Holds the pod's lock while `f` runs: keep `f` short.
    /// Panics if `pod >= self.pods()`.
    pub fn with_engine<R>(&self, pod: usize, f: impl FnOnce(&Engine) -> R) -> R {
        f(&lock(&self.pods[pod].pod.core).engine)
    }

    /// A pod's pacing and publishing counters. Panics if `pod >= self.pods()`.
    pub fn stats(&self, pod: usize) -> PodStats {
        let c = &self.pods[pod].pod.stats;
        let steps = c.steps.load(Relaxed);
        let us = |v: &AtomicU64| v.load(Relaxed) as f64 / 1e6;
        PodStats {
            steps,
            batches: c.batches.load(Relaxed),
            late_steps: c.late_steps.load(Relaxed),
            mean_lag_s: if steps == 0 {
                0.0
            } else {
                us(&c.lag_total_us) / steps as f64
            },
            max_lag_s: us(&c.lag_max_us),
        }
    }

    /// Seconds since the fleet started (the engines' clock).
    pub fn now(&self) -> f64 {
        self.clock.now()
    }

    /// Stops every task and closes every socket. Open responses end: a
    /// waiting non-streaming request gets 503, a stream ends without
    /// `[DONE]`.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for p in self.pods {
            for t in p.tasks {
                let _ = t.await;
            }
            let mut server = p.server;
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
            {
                server.abort();
                let _ = server.await;
            }
        }
    }
}
