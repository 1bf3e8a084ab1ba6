//! Workload tests: sizes against the documented shapes (computed here from
//! the shapes, not read back from the generators), sharing structure
//! through the engines' block hashes, determinism, the trace replay and
//! spec errors.

use super::*;
use kvroute_core::keys::HashScheme;
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

fn tok() -> &'static SimTokenizer {
    static TOK: OnceLock<SimTokenizer> = OnceLock::new();
    TOK.get_or_init(SimTokenizer::build)
}

fn scheme() -> KeyScheme {
    KeyScheme::new(HashScheme::Sha256Cbor, "seed", 16).expect("a valid key scheme")
}

fn spec(kind: WorkloadKind, requests: Option<usize>) -> WorkloadSpec {
    WorkloadSpec {
        requests,
        seed: 11,
        ..WorkloadSpec::new(kind)
    }
}

fn make(kind: WorkloadKind, requests: Option<usize>) -> Workload {
    generate(&spec(kind, requests), tok()).expect("generate")
}

/// Full blocks two requests have in common (their hash chains agree).
fn common_blocks(a: &SimRequest, b: &SimRequest) -> usize {
    a.block_hashes()
        .iter()
        .zip(b.block_hashes())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Tokens two prompts have in common from the start.
fn common_tokens(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (n, s) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    s / n as f64
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

/// Every request's ids are its body's ids, and arrivals are ordered.
fn assert_consistent(w: &Workload) {
    let mut last = 0.0;
    for (i, r) in w.requests.iter().enumerate() {
        let ids = match &r.body {
            Body::Chat { messages } => tok().encode_chat(messages).expect("encode"),
            Body::Completion { prompt } => tok().encode_completion(prompt).expect("encode"),
            Body::TokenIds { prompt } => prompt.clone(),
        };
        assert_eq!(ids, r.tokens, "request {i} of {}", w.name);
        assert!(r.arrival >= last, "request {i} arrives in order");
        assert!(r.output_len >= 1);
        last = r.arrival;
    }
}

#[test]
fn kinds_parse_display_and_reject_malformed_names() {
    for name in [
        "repeated",
        "tenants",
        "multi-turn",
        "rag",
        "llmd-precise",
        "unique",
        "trace:/data/t.jsonl",
    ] {
        let kind: WorkloadKind = name.parse().expect("known kind");
        assert_eq!(kind.to_string(), name);
    }
    assert_eq!(
        "trace:a b.jsonl".parse::<WorkloadKind>().expect("trace"),
        WorkloadKind::Trace(PathBuf::from("a b.jsonl"))
    );
    for bad in ["multiturn", "trace:", "Repeated", ""] {
        let e = bad.parse::<WorkloadKind>().expect_err("malformed");
        assert!(
            e.to_string().contains(&format!("{bad:?}")),
            "error names {bad:?}: {e}"
        );
    }
}

#[test]
fn bad_specs_are_errors_naming_the_value() {
    let base = spec(WorkloadKind::Unique, Some(5));
    let cases = [
        (
            WorkloadSpec {
                rate: 0.0,
                ..base.clone()
            },
            "rate 0 ",
        ),
        (
            WorkloadSpec {
                rate: f64::NAN,
                ..base.clone()
            },
            "rate NaN",
        ),
        (
            WorkloadSpec {
                time_scale: -2.5,
                ..base.clone()
            },
            "scale -2.5",
        ),
        (
            WorkloadSpec {
                requests: Some(0),
                ..base.clone()
            },
            "count 0",
        ),
    ];
    for (s, want) in cases {
        let e = generate(&s, tok()).expect_err("invalid spec");
        assert!(e.to_string().contains(want), "{e} should contain {want:?}");
    }
    // A trace ignores the rate.
    let trace = WorkloadSpec {
        rate: 0.0,
        ..spec(
            WorkloadKind::Trace(PathBuf::from("/nonexistent/x.jsonl")),
            None,
        )
    };
    let e = generate(&trace, tok()).expect_err("missing file");
    assert!(matches!(e, WorkloadError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/x.jsonl"), "{e}");
}

#[test]
fn same_spec_same_workload_other_seed_other_texts_rate_only_moves_arrivals() {
    for kind in [
        WorkloadKind::Repeated,
        WorkloadKind::Tenants,
        WorkloadKind::MultiTurn,
        WorkloadKind::Rag,
        WorkloadKind::Unique,
    ] {
        let a = make(kind.clone(), Some(40));
        assert_eq!(a, make(kind.clone(), Some(40)), "{kind} is deterministic");
        assert_consistent(&a);
        let other = generate(
            &WorkloadSpec {
                seed: 12,
                ..spec(kind.clone(), Some(40))
            },
            tok(),
        )
        .expect("generate");
        assert_ne!(a.requests[0].tokens, other.requests[0].tokens, "{kind}");
        let faster = generate(
            &WorkloadSpec {
                rate: 40.0,
                ..spec(kind.clone(), Some(40))
            },
            tok(),
        )
        .expect("generate");
        if kind != WorkloadKind::MultiTurn {
            // Same prompts in the same order, 4x as dense.
            let bodies = |w: &Workload| {
                w.requests
                    .iter()
                    .map(|r| r.body.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bodies(&a), bodies(&faster), "{kind}");
            let (ta, tf) = (
                a.requests.last().map(|r| r.arrival).unwrap_or_default(),
                faster
                    .requests
                    .last()
                    .map(|r| r.arrival)
                    .unwrap_or_default(),
            );
            assert!((ta / tf - 4.0).abs() < 1e-9, "{kind}: {ta} vs {tf}");
        }
        assert_eq!(a.model, SIM_MODEL);
        assert_eq!(a.name, kind.to_string());
    }
}

#[test]
fn repeated_is_the_seeds_run() {
    let w = make(WorkloadKind::Repeated, None);
    assert_eq!(w.requests.len(), 4_776);
    assert_eq!(w.prompt_tokens(), 4_776_000);
    let first = &w.requests[0];
    assert_eq!(first.tokens.len(), 1_000);
    assert!(
        w.requests
            .iter()
            .all(|r| r.tokens == first.tokens && r.body == first.body && r.output_len == 100)
    );
    assert!(
        matches!(&first.body, Body::Chat { messages } if messages.len() == 1 && messages[0].role == "user")
    );
    // Poisson at 10/s: 4,776 arrivals span about 477.6 s.
    let span = w.requests.last().map(|r| r.arrival).unwrap_or_default();
    assert!(within(span, 477.6, 0.05), "span {span}");
    assert_consistent(&make(WorkloadKind::Repeated, Some(3)));
}

#[test]
fn tenants_share_exactly_their_system_prompt_blocks() {
    let w = make(WorkloadKind::Tenants, Some(300));
    assert_consistent(&w);
    // BOS + system header (3) + 2,000 + eot + user header (3): 2,008 tokens,
    // 125 full blocks of 16; the user message differs from its first word.
    let shared_blocks = 2_008 / 16;
    let sim = w.clone().into_sim(&scheme());
    let mut by_tenant: HashMap<u64, Vec<&SimRequest>> = HashMap::new();
    for r in &sim {
        by_tenant
            .entry(r.session.expect("tenant"))
            .or_default()
            .push(r);
    }
    assert!(by_tenant.len() >= 6, "most of the 8 tenants appear");
    assert!(by_tenant.keys().all(|&t| t < 8));
    for (t, rs) in &by_tenant {
        for pair in rs.windows(2) {
            assert_eq!(common_blocks(pair[0], pair[1]), shared_blocks, "tenant {t}");
            assert_eq!(common_tokens(&pair[0].tokens, &pair[1].tokens), 2_008);
        }
    }
    let firsts: Vec<&SimRequest> = by_tenant.values().map(|rs| rs[0]).collect();
    for (i, a) in firsts.iter().enumerate() {
        for b in &firsts[i + 1..] {
            assert_eq!(common_blocks(a, b), 0, "tenants share no block");
        }
    }
    // Prompt: 2,008 + user (100..=300, mean 200) + eot + assistant header (3).
    let m = mean(w.requests.iter().map(|r| r.tokens.len() as f64));
    assert!(within(m, 2_212.0, 0.05), "mean prompt {m}");
    // Zipf(1) over 8: tenant 0 takes 1 / H(8) = 36.8%.
    let zero = by_tenant[&0].len() as f64 / 300.0;
    assert!((zero - 0.368).abs() < 0.08, "tenant 0 share {zero}");
}

#[test]
fn multi_turn_sessions_extend_their_previous_turn() {
    let w = make(WorkloadKind::MultiTurn, Some(400));
    assert_eq!(w.requests.len(), 400);
    assert_consistent(&w);
    let mut sessions: HashMap<u64, Vec<&WorkloadRequest>> = HashMap::new();
    for r in &w.requests {
        sessions
            .entry(r.session.expect("session"))
            .or_default()
            .push(r);
    }
    // 2..=10 turns, mean 6: about 400 / 6 sessions.
    assert!(
        (50..=90).contains(&sessions.len()),
        "{} sessions",
        sessions.len()
    );
    for (s, turns) in &sessions {
        assert!(turns.len() <= 10);
        for pair in turns.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.tokens.starts_with(&a.tokens),
                "session {s}: turn extends the last prompt"
            );
            // The new prompt adds the answer (output_len tokens + eot) and a
            // user turn (header 3 + 30..=200 + eot) and the assistant header.
            let grown = b.tokens.len() - a.tokens.len();
            let answer = a.output_len as usize + 1;
            assert!((answer + 3 + 30 + 1 + 3..=answer + 3 + 200 + 1 + 3).contains(&grown));
            assert!(b.arrival >= a.arrival + 1.0 + 0.03 * f64::from(a.output_len) - 1e-9);
            let (Body::Chat { messages: ma }, Body::Chat { messages: mb }) = (&a.body, &b.body)
            else {
                panic!("chat bodies");
            };
            assert_eq!(mb[..ma.len()], ma[..]);
            assert_eq!(mb[ma.len()].role, "assistant");
        }
    }
    // Sessions share the 300-token system prompt and diverge at the first
    // user message: BOS + header 3 + 300 + eot + user header 3 = 308 tokens.
    let firsts: Vec<&&WorkloadRequest> = sessions.values().map(|t| &t[0]).collect();
    assert_eq!(common_tokens(&firsts[0].tokens, &firsts[1].tokens), 308);
    // Sessions start at rate / mean turns = 10 / 6 per second.
    let mut starts: Vec<f64> = sessions.values().map(|t| t[0].arrival).collect();
    starts.sort_by(f64::total_cmp);
    let start_rate = (starts.len() - 1) as f64 / (starts[starts.len() - 1] - starts[0]);
    assert!(
        within(start_rate, 10.0 / 6.0, 0.3),
        "sessions start at {start_rate}/s"
    );
}

#[test]
fn rag_shares_instructions_always_and_documents_when_equal() {
    let w = make(WorkloadKind::Rag, Some(300));
    assert_consistent(&w);
    // BOS + system header 3 + 120 + eot + user header 3 = 128 tokens.
    let sim = w.clone().into_sim(&scheme());
    let mut by_doc: HashMap<u64, Vec<&SimRequest>> = HashMap::new();
    for r in &sim {
        by_doc
            .entry(r.session.expect("document"))
            .or_default()
            .push(r);
    }
    assert!(by_doc.keys().all(|&d| d < 200));
    let (hot, hot_rs) = by_doc
        .iter()
        .max_by_key(|(d, rs)| (rs.len(), std::cmp::Reverse(**d)))
        .expect("some document");
    assert!(hot_rs.len() >= 10, "a hot document (Zipf 0.9)");
    let doc_tokens = common_tokens(&hot_rs[0].tokens, &hot_rs[1].tokens) - 128;
    assert!(
        (800..=3_000).contains(&doc_tokens),
        "document {hot} has {doc_tokens} tokens"
    );
    for pair in hot_rs.windows(2) {
        assert_eq!(common_blocks(pair[0], pair[1]), (128 + doc_tokens) / 16);
    }
    let firsts: Vec<&SimRequest> = by_doc.values().map(|rs| rs[0]).collect();
    assert!(firsts.len() > 20);
    for pair in firsts.windows(2) {
        assert_eq!(common_tokens(&pair[0].tokens, &pair[1].tokens), 128);
        assert_eq!(common_blocks(pair[0], pair[1]), 8);
    }
}

#[test]
fn llmd_precise_has_150_groups_of_5_with_6000_and_1200_token_parts() {
    let w = make(WorkloadKind::LlmdPrecise, None);
    assert_eq!(w.requests.len(), 2_250);
    let mut prompts: HashMap<&[u32], usize> = HashMap::new();
    let mut groups: HashMap<u64, HashSet<&[u32]>> = HashMap::new();
    for r in &w.requests {
        assert_eq!(r.output_len, 1_000);
        assert!(matches!(r.body, Body::Completion { .. }));
        *prompts.entry(&r.tokens).or_default() += 1;
        groups
            .entry(r.session.expect("group"))
            .or_default()
            .insert(&r.tokens);
    }
    assert_eq!(prompts.len(), 750);
    assert!(
        prompts.values().all(|&n| n == 3),
        "each prompt once per pass"
    );
    assert_eq!(groups.len(), 150);
    for (g, qs) in &groups {
        assert_eq!(qs.len(), 5, "group {g}");
        let qs: Vec<&[u32]> = qs.iter().copied().collect();
        for q in &qs {
            // BOS + 6,000 + 1,200.
            assert_eq!(q.len(), 7_201);
        }
        let prefix = common_tokens(qs[0], qs[1]) - 1;
        assert!(
            within(prefix as f64, 6_000.0, 0.02),
            "group {g} prefix {prefix}"
        );
        assert_eq!(qs[0].len() - 1 - prefix, 1_200);
    }
    let heads: Vec<&[u32]> = groups
        .values()
        .map(|qs| *qs.iter().next().expect("q"))
        .collect();
    for pair in heads.windows(2) {
        assert_eq!(common_tokens(pair[0], pair[1]), 1, "groups share only BOS");
    }
    // Warm-up: the first 750 at 15/s (~50 s); then the ladder, faster.
    let at = |i: usize| w.requests[i].arrival;
    assert!(within(at(749), 50.0, 0.1), "warm-up ends at {}", at(749));
    let last_stage_rate = 93.0 / (at(2_249) - at(2_249 - 93));
    assert!(last_stage_rate > 40.0, "last stage at {last_stage_rate}/s");
    let sample = make(WorkloadKind::LlmdPrecise, Some(6));
    assert_consistent(&sample);
}

#[test]
fn llmd_ladder_matches_the_published_stages() {
    // rate x duration of llm-d's 16 stages.
    let published = [
        60, 200, 300, 760, 748, 750, 750, 735, 1_520, 1_548, 1_518, 1_470, 1_508, 1_485, 1_482,
        1_500,
    ];
    assert_eq!(llmd::stage_counts(16_334), published);
    let c = llmd::stage_counts(1_500);
    assert_eq!(c.iter().sum::<usize>(), 1_500);
    assert_eq!(
        c[0], 6,
        "60 / 16,334 of 1,500 = 5.5, rounded up by remainder"
    );
    let rates = llmd::stage_rates(2_250, 2.0);
    assert_eq!(rates.len(), 2_250);
    assert_eq!(rates[0], 30.0);
    assert_eq!(rates[750], 6.0);
    assert_eq!(rates[2_249], 120.0);
    assert_eq!(llmd::stage_rates(100, 1.0), vec![15.0; 100]);
}

#[test]
fn unique_prompts_share_no_first_block() {
    let w = make(WorkloadKind::Unique, Some(600));
    assert_consistent(&w);
    let sim = w.clone().into_sim(&scheme());
    let firsts: HashSet<_> = sim.iter().map(|r| r.block_hashes()[0]).collect();
    assert_eq!(firsts.len(), 600);
    // BOS + 200..=2,000 tokens, mean 1,100.
    let m = mean(w.requests.iter().map(|r| r.tokens.len() as f64));
    assert!(within(m, 1_101.0, 0.05), "mean prompt {m}");
    assert!(
        w.requests
            .iter()
            .all(|r| (201..=2_001).contains(&r.tokens.len()))
    );
    assert!(w.requests.iter().all(|r| r.session.is_none()));
}

#[test]
fn default_sizes() {
    for (kind, n) in [
        (WorkloadKind::Repeated, 4_776),
        (WorkloadKind::Tenants, 2_000),
        (WorkloadKind::MultiTurn, 2_000),
        (WorkloadKind::Rag, 2_000),
        (WorkloadKind::LlmdPrecise, 2_250),
        (WorkloadKind::Unique, 2_000),
    ] {
        assert_eq!(kind.default_requests(), Some(n), "{kind}");
    }
    assert_eq!(WorkloadKind::Trace("t".into()).default_requests(), None);
    assert_eq!(WorkloadKind::LlmdPrecise.default_rate(), 15.0);
    assert_eq!(WorkloadKind::Tenants.default_rate(), 10.0);
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn trace_replays_trace_rs_tokens_at_scaled_times() {
    let text = concat!(
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [4, 5]}\n",
        "{\"timestamp\": 1500, \"input_length\": 512, \"output_length\": 0, \"hash_ids\": [4]}\n",
        "{\"timestamp\": 4000, \"input_length\": 100, \"output_length\": 9, \"hash_ids\": [6]}\n",
    );
    let file = TempFile(
        std::env::temp_dir().join(format!("kvroute-sim-trace-{}.jsonl", std::process::id())),
    );
    std::fs::write(&file.0, text).expect("write trace");
    let kind = WorkloadKind::Trace(file.0.clone());
    let w = generate(
        &WorkloadSpec {
            time_scale: 0.5,
            ..spec(kind.clone(), None)
        },
        tok(),
    )
    .expect("trace");
    let parsed = crate::trace::parse(text).expect("parse");
    assert_eq!(w.requests.len(), 3);
    for (r, p) in w.requests.iter().zip(&parsed) {
        assert_eq!(r.tokens, p.tokens());
        assert_eq!(r.body, Body::TokenIds { prompt: p.tokens() });
        // A conversation's turns share their first block: its id is the
        // session a client header would carry.
        assert_eq!(r.session, p.hash_ids.first().copied());
    }
    let arrivals: Vec<f64> = w.requests.iter().map(|r| r.arrival).collect();
    assert_eq!(arrivals, vec![0.0, 0.75, 2.0]);
    let outputs: Vec<u32> = w.requests.iter().map(|r| r.output_len).collect();
    assert_eq!(
        outputs,
        vec![3, 1, 9],
        "an output of 0 becomes the first token"
    );
    assert_eq!(
        common_tokens(&w.requests[0].tokens, &w.requests[1].tokens),
        512
    );
    let first_two = generate(&spec(kind.clone(), Some(2)), tok()).expect("trace");
    assert_eq!(first_two.requests.len(), 2);
    assert_eq!(first_two.requests[1].arrival, 1.5);

    std::fs::write(&file.0, "{\"timestamp\": 0}\n").expect("write trace");
    let e = generate(&spec(kind, None), tok()).expect_err("bad trace");
    assert!(matches!(e, WorkloadError::Trace { .. }));
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn openai_bodies_and_sim_requests() {
    let w = make(WorkloadKind::Tenants, Some(2));
    let r = &w.requests[0];
    let body = r.openai_body("m");
    assert_eq!(body["model"], "m");
    assert_eq!(body["max_tokens"], r.output_len);
    assert_eq!(body["ignore_eos"], true);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["role"], "user");
    assert_eq!(r.body.endpoint(), "/v1/chat/completions");
    let ids = WorkloadRequest {
        arrival: 0.0,
        body: Body::TokenIds { prompt: vec![7, 8] },
        tokens: vec![7, 8],
        output_len: 4,
        session: None,
    };
    assert_eq!(ids.openai_body("m")["prompt"], serde_json::json!([7, 8]));
    assert_eq!(ids.body.endpoint(), "/v1/completions");
    let text = Body::Completion { prompt: "a".into() };
    assert_eq!(
        serde_json::to_value(&text).expect("json"),
        serde_json::json!({"prompt": "a"})
    );

    let sim = w.clone().into_sim(&scheme());
    assert_eq!(sim.len(), 2);
    for (i, (s, r)) in sim.iter().zip(&w.requests).enumerate() {
        assert_eq!(s.id, i as u64);
        assert_eq!(s.arrival, r.arrival);
        assert_eq!(&s.tokens[..], &r.tokens[..]);
        assert_eq!(s.block_hashes().len(), r.tokens.len() / 16);
        assert_eq!(s.session, r.session);
    }
}

#[test]
fn zipf_and_poisson_helpers() {
    let z = Zipf::new(8, 1.0);
    let mut rng = StdRng::seed_from_u64(3);
    let mut counts = [0usize; 8];
    for _ in 0..40_000 {
        counts[z.sample(&mut rng)] += 1;
    }
    // 1/H(8) = 0.3679, 1/(8 H(8)) = 0.0460.
    assert!(
        (counts[0] as f64 / 40_000.0 - 0.3679).abs() < 0.01,
        "{counts:?}"
    );
    assert!(
        (counts[7] as f64 / 40_000.0 - 0.0460).abs() < 0.005,
        "{counts:?}"
    );
    let a = poisson_arrivals(&mut rng, 20_000, 4.0);
    assert!(a.windows(2).all(|p| p[1] > p[0]));
    assert!(within(a[19_999] / 20_000.0, 0.25, 0.03), "mean gap");
    assert_ne!(mix(1, 1), mix(1, 2));
}
