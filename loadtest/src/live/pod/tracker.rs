//! Which HTTP request gets how many tokens after each engine step.
//!
//! The engine reports the requests whose first token a step produced and
//! those it finished, but only a count of the sequences that decoded
//! (`decode_seqs`): a streaming response needs one chunk per token, so the
//! tracker infers who decoded. Without preemption this is exact: with
//! `max_num_seqs <= max_num_batched_tokens` every running request that has
//! its first token decodes one token in every step (running requests are
//! scheduled first, one token each, and a request still prefilling in
//! chunks took the whole remaining budget when it was admitted, so nothing
//! behind it runs until it is done). A preempted request stops producing
//! tokens; when more sequences decode than the tracker believes, the
//! difference are resumed requests, taken most recently preempted first
//! (vLLM puts a victim at the front of the waiting queue), credited with the
//! token their recomputation produced unseen. However the inference goes,
//! the first token and the finish are the engine's own, and a finished
//! request is topped up to exactly its `output_len` tokens.

use kvroute_sim::engine::StepOutcome;
use std::collections::HashMap;
use tokio::sync::mpsc::UnboundedSender;

/// What one step means for one HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `tokens` new tokens exist (the first of them the request's first
    /// token if none came before); `finished`: that was the last of them.
    Step { tokens: u32, finished: bool },
    /// The engine refused the request (its cache could never hold it).
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No token yet (waiting, or prefilling).
    Prefill,
    /// Has its first token: decodes one token a step.
    Decoding,
    /// Preempted after its first token: recomputing, producing nothing
    /// visible until it decodes again.
    Stalled,
}

#[derive(Debug)]
struct Tracked {
    tx: UnboundedSender<Progress>,
    output_len: u32,
    emitted: u32,
    phase: Phase,
}

/// The in-flight requests of one pod, keyed by engine request id.
#[derive(Debug, Default)]
pub struct Tracker {
    reqs: HashMap<u64, Tracked>,
    /// Stalled request ids, most recently preempted last.
    stalled: Vec<u64>,
}

impl Tracker {
    /// Starts tracking request `id` (before it is submitted, so no step can
    /// produce its first token unseen).
    pub fn insert(&mut self, id: u64, output_len: u32, tx: UnboundedSender<Progress>) {
        self.reqs.insert(
            id,
            Tracked {
                tx,
                output_len: output_len.max(1),
                emitted: 0,
                phase: Phase::Prefill,
            },
        );
    }

    /// Requests still in the engine.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.reqs.len()
    }

    /// Applies one step's outcome; returns the messages to deliver when the
    /// step ends (the caller sleeps the step's duration first). Requests
    /// whose client went away are still tracked (the engine still runs
    /// them, and the decode count must add up); their messages are simply
    /// not received.
    pub fn apply(&mut self, o: &StepOutcome) -> Vec<(UnboundedSender<Progress>, Progress)> {
        let mut out = Vec::new();
        for id in &o.rejected {
            if let Some(t) = self.reqs.remove(id) {
                out.push((t.tx, Progress::Rejected));
            }
        }
        for id in &o.preempted {
            if let Some(t) = self.reqs.get_mut(id)
                && t.phase == Phase::Decoding
            {
                t.phase = Phase::Stalled;
                self.stalled.push(*id);
            }
        }
        // Who decoded: every Decoding request, plus resumed ones if the
        // engine counted more; fewer only if the budget ran out (not with
        // vLLM-like settings), then the oldest requests first.
        let mut decoding: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, t)| t.phase == Phase::Decoding)
            .map(|(id, _)| *id)
            .collect();
        decoding.sort_unstable();
        let counted = usize::try_from(o.decode_seqs).unwrap_or(usize::MAX);
        let mut new: HashMap<u64, u32> = HashMap::new();
        if counted < decoding.len() {
            decoding.truncate(counted);
        }
        for id in &decoding {
            *new.entry(*id).or_default() += 1;
        }
        let mut resumed = counted.saturating_sub(decoding.len());
        while resumed > 0 {
            let Some(id) = self.stalled.pop() else { break };
            if let Some(t) = self.reqs.get_mut(&id) {
                t.phase = Phase::Decoding;
                // This step's token and the one its recomputation made.
                *new.entry(id).or_default() += 2;
                resumed -= 1;
            }
        }
        for id in &o.first_tokens {
            if let Some(t) = self.reqs.get_mut(id) {
                t.phase = Phase::Decoding;
                *new.entry(*id).or_default() += 1;
            }
        }
        for id in &o.finished {
            if let Some(t) = self.reqs.remove(id) {
                new.remove(id);
                let tokens = t.output_len.saturating_sub(t.emitted);
                out.push((
                    t.tx,
                    Progress::Step {
                        tokens,
                        finished: true,
                    },
                ));
            }
        }
        if !o.finished.is_empty() {
            self.stalled.retain(|id| self.reqs.contains_key(id));
        }
        let mut ids: Vec<_> = new.into_iter().collect();
        ids.sort_unstable();
        for (id, n) in ids {
            let Some(t) = self.reqs.get_mut(&id) else {
                continue;
            };
            // The last token is the finish's: never report it early.
            let n = n.min(t.output_len.saturating_sub(1).saturating_sub(t.emitted));
            if n == 0 {
                continue;
            }
            t.emitted += n;
            out.push((
                t.tx.clone(),
                Progress::Step {
                    tokens: n,
                    finished: false,
                },
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::keys::{HashScheme, KeyScheme};
    use kvroute_sim::engine::{CostModel, Engine, EngineConfig};
    use kvroute_sim::request::SimRequest;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn config(num_gpu_blocks: usize) -> EngineConfig {
        EngineConfig {
            block_size: 16,
            num_gpu_blocks,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            chunked_prefill: true,
            cost: CostModel::llama31_8b_h100(),
            scheme: KeyScheme::new(HashScheme::Sha256Cbor, "seed", 16).expect("block size 16"),
            model_name: "m".into(),
        }
    }

    fn request(c: &EngineConfig, id: u64, len: u32, output_len: u32) -> SimRequest {
        let tokens = (0..len).map(|k| id as u32 * 1000 + k).collect();
        SimRequest::new(id, 0.0, tokens, output_len, None, &c.scheme)
    }

    /// Runs the engine to the end, tracking every request; returns, per
    /// request, the token counts of the messages it received per step (0
    /// where it got none) and whether its last message said finished.
    fn drive(c: EngineConfig, reqs: &[SimRequest]) -> (Vec<Vec<u32>>, Vec<bool>, u64) {
        let mut e = Engine::new(c);
        let mut tracker = Tracker::default();
        let mut rxs: Vec<UnboundedReceiver<Progress>> = Vec::new();
        for r in reqs {
            let (tx, rx) = unbounded_channel();
            tracker.insert(r.id, r.output_len, tx);
            e.submit(0.0, r);
            rxs.push(rx);
        }
        let mut per_step = vec![Vec::new(); reqs.len()];
        let mut finished = vec![false; reqs.len()];
        let (mut t, mut preemptions) = (0.0, 0);
        while e.has_work() {
            let o = e.step(t);
            t += o.duration_s;
            preemptions += o.preempted.len() as u64;
            for (tx, p) in tracker.apply(&o) {
                tx.send(p).expect("receiver alive");
            }
            for (i, rx) in rxs.iter_mut().enumerate() {
                let mut n = 0;
                while let Ok(p) = rx.try_recv() {
                    match p {
                        Progress::Step {
                            tokens,
                            finished: f,
                        } => {
                            n += tokens;
                            finished[i] |= f;
                        }
                        Progress::Rejected => panic!("nothing is rejected here"),
                    }
                }
                per_step[i].push(n);
            }
        }
        assert_eq!(tracker.len(), 0, "finished requests are dropped");
        (per_step, finished, preemptions)
    }

    #[test]
    fn one_token_per_step_after_the_prefill() {
        let c = config(4096);
        // A: 100-token prompt, 4 tokens; B: 40-token prompt, 2 tokens. Both
        // are admitted in the first step (140 < 8192 budget).
        let reqs = [request(&c, 0, 100, 4), request(&c, 1, 40, 2)];
        let (steps, finished, preemptions) = drive(c, &reqs);
        assert_eq!(preemptions, 0);
        assert_eq!(steps[0], vec![1, 1, 1, 1]);
        assert_eq!(steps[1], vec![1, 1, 0, 0]);
        assert_eq!(finished, vec![true, true]);
    }

    #[test]
    fn a_single_token_request_finishes_with_its_first_token() {
        let c = config(4096);
        let (steps, finished, _) = drive(c.clone(), &[request(&c, 0, 30, 1)]);
        assert_eq!((steps[0].clone(), finished[0]), (vec![1], true));
    }

    #[test]
    fn preempted_requests_still_get_exactly_their_tokens() {
        // 8 usable blocks; four requests of 40 + 29 KV tokens (5 blocks
        // each) preempt each other.
        let c = config(9);
        let reqs: Vec<_> = (0..4).map(|id| request(&c, id, 40, 30)).collect();
        let (steps, finished, preemptions) = drive(c, &reqs);
        assert!(preemptions > 0, "the cache is too small for all four");
        for s in &steps {
            assert_eq!(s.iter().sum::<u32>(), 30);
        }
        assert_eq!(finished, vec![true; 4]);
    }

    #[test]
    fn refused_requests_are_told() {
        let c = config(5);
        let mut e = Engine::new(c.clone());
        let mut tracker = Tracker::default();
        let (tx, mut rx) = unbounded_channel();
        let r = request(&c, 7, 60, 10);
        tracker.insert(7, 10, tx);
        e.submit(0.0, &r);
        for (tx, p) in tracker.apply(&e.step(0.0)) {
            tx.send(p).expect("receiver alive");
        }
        assert_eq!(rx.try_recv(), Ok(Progress::Rejected));
        assert_eq!(tracker.len(), 0);
    }
}
