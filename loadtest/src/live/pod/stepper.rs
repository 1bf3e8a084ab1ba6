//! A pod's engine task: steps the engine at wall-clock speed.
//!
//! When the engine has work: `step(now)` (with `now` the fleet's clock),
//! sleep until `now + duration_s` (no sleep when already past it: the lag
//! is recorded instead, and the next step starts from the real clock, so a
//! slow machine stretches steps rather than bunching them), then publish
//! the step's KV events as one batch and tell the HTTP requests what the
//! step produced. Idle, it waits on the pod's `Notify` (a request's
//! arrival), never polling.

use super::events::Publisher;
use super::{Pod, lock};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause after a step that took no time yet left work behind (the engine
/// refuses a stuck head rather than stall, so this is a guard against a
/// spin, not a path taken in practice).
const EMPTY_STEP_PAUSE: Duration = Duration::from_millis(1);

pub async fn run(pod: Arc<Pod>, mut publisher: Publisher, stop: CancellationToken) {
    'run: loop {
        loop {
            if stop.is_cancelled() {
                break 'run;
            }
            if lock(&pod.core).engine.has_work() {
                break;
            }
            // A notify_one before this await leaves a permit: no arrival
            // is missed between the check and the wait.
            tokio::select! {
                () = stop.cancelled() => break 'run,
                () = pod.wake.notified() => {}
            }
        }
        let now = pod.clock.now();
        let (outcome, events, messages) = {
            let mut core = lock(&pod.core);
            let outcome = core.engine.step(now);
            let events = core.engine.take_events();
            let messages = core.tracker.apply(&outcome);
            (outcome, events, messages)
        };
        let end = pod.clock.at(now + outcome.duration_s);
        if Instant::now() < end {
            tokio::select! {
                () = stop.cancelled() => break 'run,
                () = tokio::time::sleep_until(end) => {}
            }
        } else if outcome.duration_s > 0.0 {
            pod.stats.late_steps.fetch_add(1, Relaxed);
        }
        let lag = Instant::now().saturating_duration_since(end);
        let lag_us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        pod.stats.lag_total_us.fetch_add(lag_us, Relaxed);
        pod.stats.lag_max_us.fetch_max(lag_us, Relaxed);
        pod.stats.steps.fetch_add(1, Relaxed);
        publisher.publish(&events).await;
        pod.stats.batches.store(publisher.sent(), Relaxed);
        for (tx, progress) in messages {
            // A closed receiver is a client that left: the engine still
            // runs its request to the end (it has no abort).
            let _ = tx.send(progress);
        }
        if outcome.duration_s <= 0.0 {
            tokio::select! {
                () = stop.cancelled() => break 'run,
                () = tokio::time::sleep(EMPTY_STEP_PAUSE) => {}
            }
        }
    }
    // Dropping the senders ends every waiting response.
    lock(&pod.core).tracker = Default::default();
    publisher.close().await;
}
