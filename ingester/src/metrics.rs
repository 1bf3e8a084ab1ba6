//! The ingester's metric names, in one place, all prefixed `kvroute_ingester_`.
//! Counters are recorded through the `metrics` facade (free when no recorder
//! is installed, as in unit tests); `/metrics` renders them for Prometheus.

/// Events applied, by `type` (BlockStored...) and `outcome` (applied, unkeyed,
/// or rebuilt: re-applied from the replay buffer after a shed, counted once
/// more only here).
pub const EVENTS: &str = "kvroute_ingester_events_total";
/// Blocks, by `type` and `outcome` (stored, removed, unkeyed reason).
pub const BLOCKS: &str = "kvroute_ingester_blocks_total";
/// Batches received, by sequence `verdict` (first, next, gap, restart, duplicate).
pub const BATCHES: &str = "kvroute_ingester_batches_total";
/// Messages skipped before decoding or failing to decode, by `reason`.
pub const MALFORMED: &str = "kvroute_ingester_malformed_total";
/// Unknown event types and fields the decoder skipped, by `reason`.
pub const SKIPPED: &str = "kvroute_ingester_decode_skipped_total";
/// Batches missed in sequence gaps (without a successful replay).
pub const GAP_BATCHES: &str = "kvroute_ingester_gap_batches_total";
/// Replays, by `outcome` (ok, error; a gap not replayed: `cooldown` after a
/// failed replay of the pod, `not_configured` without `--replay-endpoint`).
pub const REPLAYS: &str = "kvroute_ingester_replays_total";
/// Engine restarts detected (sequence back to 0).
pub const RESTARTS: &str = "kvroute_ingester_restarts_total";
/// Blocks whose engine hash equals (`agree=true`) or differs from the computed key.
pub const HASH_AGREEMENT: &str = "kvroute_ingester_hash_agreement_total";
/// Removed blocks by how their engine hash became a block key: `source` =
/// `chain_cache` (the keying stage knew it; no `engine:` read) or `index`
/// (resolved by the index from its `engine:` mapping).
pub const REMOVAL_RESOLUTION: &str = "kvroute_ingester_removal_resolution_total";
/// Index writes in flight, all workers (each at most `--max-inflight-writes`).
pub const WRITES_IN_FLIGHT: &str = "kvroute_ingester_index_writes_in_flight";
/// Index writes, by `outcome` (ok, error).
pub const WRITES: &str = "kvroute_ingester_index_writes_total";
/// Index write latency in seconds.
pub const WRITE_SECONDS: &str = "kvroute_ingester_index_write_seconds";
/// Operations dropped because the index was unreachable too long, by pods marked for rebuild.
pub const DROPPED_OPS: &str = "kvroute_ingester_dropped_ops_total";
/// Lag from the batch's publisher timestamp to its application, in seconds.
pub const LAG_SECONDS: &str = "kvroute_ingester_lag_seconds";
/// Batches queued for the ordering workers (all workers).
pub const QUEUE_DEPTH: &str = "kvroute_ingester_queue_depth";
/// Operations not yet acknowledged by the index (pending, in flight, and the
/// clears of shed pods), as last set by any worker.
pub const PENDING_OPS: &str = "kvroute_ingester_pending_ops";
/// Pods purged (admin call, CLI, or gone from the candidate set), by `reason`.
pub const PURGES: &str = "kvroute_ingester_purges_total";
/// Shed pods rebuilt from their replay buffer after their clear, by `outcome` (ok, error).
pub const REBUILDS: &str = "kvroute_ingester_rebuilds_total";
/// Batches applied by those rebuilds.
pub const REBUILT_BATCHES: &str = "kvroute_ingester_rebuilt_batches_total";
/// Live batches dropped because their stream already held `--replay-max-held`
/// batches while its gap was being replayed (the hole shows as a later gap).
pub const REPLAY_OVERFLOW: &str = "kvroute_ingester_replay_overflow_total";
/// Admin requests refused, by `reason` (no_token, bad_token, not_loopback).
pub const ADMIN_REFUSED: &str = "kvroute_ingester_admin_refused_total";
/// Topic problems that leave a publisher unindexed or unroutable, by `reason`
/// (empty, unparseable, no_port, too_long, model_too_long), per batch; each
/// topic is also warned about once in the log.
pub const TOPIC_WARNINGS: &str = "kvroute_ingester_topic_warnings_total";
/// Streams forgotten because more than `--max-topics` were tracked.
pub const TOPICS_EVICTED: &str = "kvroute_ingester_topics_evicted_total";
/// ZeroMQ peers disconnected by the transport bounds, by `mode` (bind,
/// connect, replay) and `reason` (`socket::Rejected`: too_large,
/// handshake_timeout, too_many_connections, protocol).
pub const ZMQ_REJECTED: &str = "kvroute_ingester_zmq_rejected_total";
/// Batches dropped because they arrived before the index answered and the
/// startup buffer (`--startup-buffer`) was full; each topic's loss is then
/// handled as a sequence gap.
pub const STARTUP_DROPPED: &str = "kvroute_ingester_startup_dropped_batches_total";
/// Redis found to have lost or rewound data, by `kind` (epoch_missing,
/// epoch_changed, counter_rewound); each clears and rebuilds this ingester's pods.
pub const DATA_LOSS: &str = "kvroute_ingester_redis_data_loss_total";
/// 1 while `kvroute:keying` holds another scheme, seed or block size than
/// this ingester's (not overwritten), else 0.
pub const KEYING_CONFLICT: &str = "kvroute_ingester_keying_conflict";
