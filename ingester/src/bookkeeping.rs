//! What the ingester keeps in Redis besides the block index, in one task
//! that runs every `--redis-epoch-interval`:
//!
//! - **Data loss detection.** `kvroute:epoch` is a HASH: `id` (a random id,
//!   `HSETNX`: the first ingester after a wipe sets it) and `counter`, which
//!   every ingester `HINCRBY`s on each check and remembers. Redis restarted
//!   empty: `id` is missing (our `HSETNX` created it). Redis restarted from
//!   an older RDB/AOF (or another data set): `id` differs, or `counter` is
//!   not above the last value this process got. Either way earlier blocks may
//!   be missing and removed blocks back: the ingester logs an ERROR, counts
//!   it (`kvroute_ingester_redis_data_loss_total{kind}`), and every worker
//!   clears the pods it has heard and rebuilds them from their replay socket
//!   (`worker/rebuild.rs`, the machinery of long outages) where
//!   `--replay-endpoint` is set; without it the pods are cleared before
//!   their pending operations and re-indexed from live events (not after an
//!   empty restart: nothing stale can be there). During an outage the check
//!   fails and judges nothing; the first check after Redis is back does, and
//!   a pod the outage path already rebuilt since then is not rebuilt twice
//!   (`Worker::resync`). Limit: on a Redis Cluster the epoch lives on the master
//!   of its slot, so only that master's loss is seen.
//! - **Keying** (`kvroute:keying`, the contract the scorer checks): written
//!   once the index answers and again after a detected loss; a hash written
//!   by another ingester with another scheme, seed or block size is left as
//!   it is (first writer wins), logged as an ERROR naming both and shown by
//!   the gauge `kvroute_ingester_keying_conflict` = 1.
//! - **Models** (`kvroute:models`: model -> unix ms last seen): HSET the
//!   first time the process indexes a model, then at most once a minute
//!   per model; all again after a detected loss.

use crate::metrics as m;
use crate::pipeline::Purger;
use crate::worker::Resync;
use kvroute_redis::{AnyIndex, Error, RedisIndex};
use parking_lot::Mutex;
use redis::Value;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

pub const EPOCH_KEY: &str = "kvroute:epoch";
pub const KEYING_KEY: &str = "kvroute:keying";
pub const MODELS_KEY: &str = "kvroute:models";
/// How often a model still being indexed is stamped again.
pub const MODEL_REFRESH: Duration = Duration::from_secs(60);
/// Models remembered per process (a bound against a flood of topics naming
/// made-up models); past it new models are not registered.
pub const MAX_MODELS: usize = 10_000;

/// How Redis showed that it lost or rewound data; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLoss {
    /// The epoch id was gone: restarted empty (or from a dump older than
    /// any ingester's epoch).
    EpochMissing,
    /// Another epoch id: another data set, or a loss another ingester
    /// noticed first.
    EpochChanged,
    /// Same epoch, but the counter not above what this process last got:
    /// restored from an older dump.
    CounterRewound,
}

impl DataLoss {
    pub fn as_label(self) -> &'static str {
        match self {
            DataLoss::EpochMissing => "epoch_missing",
            DataLoss::EpochChanged => "epoch_changed",
            DataLoss::CounterRewound => "counter_rewound",
        }
    }
}

/// The epoch and counter this process saw last.
#[derive(Debug, Default)]
pub struct EpochState {
    last: Option<(String, i64)>,
}

impl EpochState {
    /// Judges one check: whether our `HSETNX` `created` the id, the `id`
    /// now, the `counter` our `HINCRBY` returned. The first check only
    /// learns them.
    pub fn observe(&mut self, created: bool, id: String, counter: i64) -> Option<DataLoss> {
        let verdict = match &self.last {
            None => None,
            Some(_) if created => Some(DataLoss::EpochMissing),
            Some((last_id, _)) if *last_id != id => Some(DataLoss::EpochChanged),
            Some((_, last)) if counter <= *last => Some(DataLoss::CounterRewound),
            Some(_) => None,
        };
        self.last = Some((id, counter));
        verdict
    }
}

/// A fresh epoch id: 64 random bits (std's per-process random hasher keys)
/// and the time.
fn random_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(unix_ms() as u128);
    h.write_u32(std::process::id());
    format!("{:016x}-{:x}", h.finish(), unix_ms())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One epoch check: `HSETNX id`, `HGET id`, `HINCRBY counter 1`.
pub async fn check_epoch(
    index: &RedisIndex,
    state: &mut EpochState,
) -> Result<Option<DataLoss>, Error> {
    let cmds = vec![
        redis::cmd("HSETNX")
            .arg(EPOCH_KEY)
            .arg("id")
            .arg(random_id())
            .clone(),
        redis::cmd("HGET").arg(EPOCH_KEY).arg("id").clone(),
        redis::cmd("HINCRBY")
            .arg(EPOCH_KEY)
            .arg("counter")
            .arg(1)
            .clone(),
    ];
    let replies = index.run_at_key(EPOCH_KEY, cmds).await?;
    let (created, id, counter) = match replies.as_slice() {
        [Value::Int(c), Value::BulkString(id), Value::Int(n)] => {
            (*c == 1, String::from_utf8_lossy(id).into_owned(), *n)
        }
        other => {
            return Err(Error::Reply(format!(
                "{EPOCH_KEY} check answered {other:?}"
            )));
        }
    };
    Ok(state.observe(created, id, counter))
}

/// This ingester's keying, as `kvroute:keying` holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keying {
    pub hash_scheme: String,
    pub hash_seed: String,
    pub block_size: usize,
    /// Replica id / hostname.
    pub writer: String,
}

/// What publishing the keying found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Written,
    /// Another scheme, seed or block size was there; left as it is.
    Conflict {
        hash_scheme: String,
        hash_seed: String,
        block_size: String,
    },
}

/// Writes the hash unless it holds another keying (atomically, so two
/// ingesters starting at once cannot both win): returns `{}` when written,
/// else the fields found.
const PUBLISH_KEYING: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'hash_scheme', 'hash_seed', 'block_size')
if cur[1] and (cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3]) then
  return {cur[1], cur[2] or '', cur[3] or ''}
end
redis.call('HSET', KEYS[1], 'hash_scheme', ARGV[1], 'hash_seed', ARGV[2],
  'block_size', ARGV[3], 'updated_ms', ARGV[4], 'writer', ARGV[5])
return {}
";

/// Publishes `keying` to `kvroute:keying` (first writer wins), logs and
/// sets the conflict gauge.
pub async fn publish_keying(index: &RedisIndex, keying: &Keying) -> Result<Published, Error> {
    let cmd = redis::cmd("EVAL")
        .arg(PUBLISH_KEYING)
        .arg(1)
        .arg(KEYING_KEY)
        .arg(&keying.hash_scheme)
        .arg(&keying.hash_seed)
        .arg(keying.block_size.to_string())
        .arg(unix_ms().to_string())
        .arg(&keying.writer)
        .clone();
    let replies = index.run_at_key(KEYING_KEY, vec![cmd]).await?;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    let published = match replies.first() {
        Some(Value::Array(found)) if found.is_empty() => Published::Written,
        Some(Value::Array(found)) if found.len() == 3 => Published::Conflict {
            hash_scheme: text(&found[0]),
            hash_seed: text(&found[1]),
            block_size: text(&found[2]),
        },
        other => {
            return Err(Error::Reply(format!(
                "{KEYING_KEY} publish answered {other:?}"
            )));
        }
    };
    match &published {
        Published::Written => {
            metrics::gauge!(m::KEYING_CONFLICT).set(0.0);
            tracing::info!(scheme = %keying.hash_scheme, seed = %keying.hash_seed, block_size = keying.block_size, "keying published to {KEYING_KEY}");
        }
        Published::Conflict {
            hash_scheme,
            hash_seed,
            block_size,
        } => {
            metrics::gauge!(m::KEYING_CONFLICT).set(1.0);
            tracing::error!(
                ours.scheme = %keying.hash_scheme, ours.seed = %keying.hash_seed, ours.block_size = keying.block_size,
                index.scheme = %hash_scheme, index.seed = %hash_seed, index.block_size = %block_size,
                "{KEYING_KEY} holds another keying than this ingester's (--hash-scheme/--hash-seed/--block-size); \
                 not overwritten: the fleet's ingesters disagree, and keys written by one are not found with the other's"
            );
        }
    }
    Ok(published)
}

/// Models seen by the workers, to be stamped in `kvroute:models`. Cheap to
/// note from the hot path: one lock and a lookup per batch.
#[derive(Clone, Default, Debug)]
pub struct ModelsSeen(Arc<Mutex<ModelsInner>>);

#[derive(Default, Debug)]
struct ModelsInner {
    /// Model -> when it was last written.
    written: HashMap<String, Instant>,
    /// Models to write at the next flush.
    due: HashSet<String>,
}

impl ModelsSeen {
    /// The workers indexed a batch of `model`.
    pub fn note(&self, model: &str) {
        let mut g = self.0.lock();
        let fresh = g
            .written
            .get(model)
            .is_some_and(|at| at.elapsed() < MODEL_REFRESH);
        if fresh || g.due.contains(model) {
            return;
        }
        if g.written.len() + g.due.len() >= MAX_MODELS && !g.written.contains_key(model) {
            return;
        }
        g.due.insert(model.to_owned());
    }

    /// After a data loss: every model known is written again.
    pub fn rewrite_all(&self) {
        let mut g = self.0.lock();
        let all: Vec<String> = g.written.drain().map(|(m, _)| m).collect();
        g.due.extend(all);
    }

    /// HSETs the due models; on failure they stay due.
    pub async fn flush(&self, index: &RedisIndex) -> Result<usize, Error> {
        let due: Vec<String> = std::mem::take(&mut self.0.lock().due).into_iter().collect();
        if due.is_empty() {
            return Ok(0);
        }
        let now = unix_ms().to_string();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(MODELS_KEY);
        for model in &due {
            cmd.arg(model).arg(&now);
        }
        match index.run_at_key(MODELS_KEY, vec![cmd]).await {
            Ok(_) => {
                let mut g = self.0.lock();
                let at = Instant::now();
                for model in &due {
                    g.written.insert(model.clone(), at);
                }
                Ok(due.len())
            }
            Err(e) => {
                self.0.lock().due.extend(due);
                Err(e)
            }
        }
    }
}

/// Runs the checks every `interval` until `shutdown` (see the module doc).
pub async fn run(
    index: Arc<AnyIndex>,
    keying: Keying,
    models: ModelsSeen,
    workers: Purger,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let AnyIndex::Redis(index) = index.as_ref() else {
        return;
    };
    let mut state = EpochState::default();
    let mut keying_due = true;
    // The last check that found the data intact.
    let mut intact_at = Instant::now();
    loop {
        let checked_at = Instant::now();
        match check_epoch(index, &mut state).await {
            Ok(Some(loss)) => {
                metrics::counter!(m::DATA_LOSS, "kind" => loss.as_label()).increment(1);
                tracing::error!(
                    kind = loss.as_label(),
                    "Redis lost or rewound data (restarted empty or from an older dump): \
                     clearing this ingester's pods and rebuilding them (from replay where configured)"
                );
                workers
                    .resync(Resync {
                        since: intact_at,
                        stale_possible: loss != DataLoss::EpochMissing,
                    })
                    .await;
                intact_at = checked_at;
                keying_due = true;
                models.rewrite_all();
            }
            Ok(None) => intact_at = checked_at,
            Err(e) => {
                tracing::debug!(error = %e, "epoch check failed (Redis unreachable?); judged at the next one")
            }
        }
        if keying_due {
            match publish_keying(index, &keying).await {
                Ok(_) => keying_due = false,
                Err(e) => tracing::warn!(error = %e, "cannot publish {KEYING_KEY} yet; retrying"),
            }
        }
        if let Err(e) = models.flush(index).await {
            tracing::debug!(error = %e, "cannot write {MODELS_KEY} yet; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_verdicts() {
        let mut s = EpochState::default();
        assert_eq!(
            s.observe(true, "a".into(), 1),
            None,
            "the first check learns"
        );
        assert_eq!(s.observe(false, "a".into(), 5), None, "others count too");
        assert_eq!(s.observe(true, "b".into(), 1), Some(DataLoss::EpochMissing));
        assert_eq!(
            s.observe(false, "c".into(), 9),
            Some(DataLoss::EpochChanged)
        );
        assert_eq!(
            s.observe(false, "c".into(), 9),
            Some(DataLoss::CounterRewound)
        );
        assert_eq!(
            s.observe(false, "c".into(), 4),
            Some(DataLoss::CounterRewound)
        );
        assert_eq!(s.observe(false, "c".into(), 5), None);
    }

    #[test]
    fn models_are_due_once_then_after_a_minute_or_a_loss() {
        let m = ModelsSeen::default();
        m.note("a");
        m.note("a");
        assert_eq!(m.0.lock().due.len(), 1);
        {
            let mut g = m.0.lock();
            g.due.clear();
            g.written.insert("a".into(), Instant::now());
        }
        m.note("a");
        assert!(m.0.lock().due.is_empty(), "written less than a minute ago");
        m.rewrite_all();
        assert!(m.0.lock().due.contains("a"));
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
    }
}
