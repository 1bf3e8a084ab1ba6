use std::sync::Arc;

use super::*;
use crate::testutil::{TempDir, tiny_json};

fn put_tokenizer(dir: &TempDir, rel: &str) {
    dir.write(&format!("{rel}/tokenizer.json"), &tiny_json().to_string());
}

#[test]
fn parses_model_equals_path() {
    assert_eq!(
        parse_tokenizer_arg("meta-llama/Llama-3.1-8B=/models/llama").unwrap(),
        (
            "meta-llama/Llama-3.1-8B".to_string(),
            PathBuf::from("/models/llama")
        )
    );
    assert_eq!(
        parse_tokenizer_arg("m=/a=b").unwrap().1,
        PathBuf::from("/a=b")
    );
    for bad in ["", "model", "=path", "model="] {
        assert!(
            matches!(parse_tokenizer_arg(bad), Err(TokensError::BadArg(_))),
            "{bad}"
        );
    }
}

#[test]
fn finds_hf_cache_snapshot_from_refs_main_else_newest() {
    let root = TempDir::new("hf");
    let repo = "models--org--model";
    put_tokenizer(&root, &format!("{repo}/snapshots/aaa"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    put_tokenizer(&root, &format!("{repo}/snapshots/bbb"));
    root.write(&format!("{repo}/refs/main"), "aaa\n");
    let want_a = root.path().join(repo).join("snapshots/aaa");
    assert_eq!(resolve_model_dir(root.path(), "org/model"), Some(want_a));
    std::fs::remove_file(root.path().join(repo).join("refs/main")).unwrap();
    let want_b = root.path().join(repo).join("snapshots/bbb");
    assert_eq!(resolve_model_dir(root.path(), "org/model"), Some(want_b));
    // HF_HOME layout: <root>/hub/models--...
    let home = TempDir::new("hfhome");
    put_tokenizer(&home, "hub/models--solo/snapshots/r1");
    assert!(resolve_model_dir(home.path(), "solo").is_some());
}

#[test]
fn finds_plain_layout_and_rejects_traversal() {
    let root = TempDir::new("plain");
    put_tokenizer(&root, "org/model");
    assert_eq!(
        resolve_model_dir(root.path(), "org/model"),
        Some(root.path().join("org/model"))
    );
    assert_eq!(resolve_model_dir(root.path(), "org/other"), None);
    let inner = TempDir::new("inner");
    put_tokenizer(&inner, "x");
    for bad in ["../x", "/etc", "org/../org/model", ""] {
        assert_eq!(resolve_model_dir(root.path(), bad), None, "{bad}");
    }
}

#[test]
fn loads_once_shares_the_arc_and_remembers_failures() {
    let root = TempDir::new("reg");
    put_tokenizer(&root, "org/model");
    let explicit = root.write("explicit/tokenizer.json", &tiny_json().to_string());
    root.write("org/broken/tokenizer.json", "{broken");
    let reg = Arc::new(TokenizerRegistry::new(
        [("alias".to_string(), explicit)],
        vec![root.path().to_path_buf()],
        TokenizerOptions::default(),
    ));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let reg = reg.clone();
            std::thread::spawn(move || reg.get("org/model").expect("load"))
        })
        .collect();
    let loaded: Vec<Arc<Tokenizer>> = threads
        .into_iter()
        .map(|t| t.join().expect("join"))
        .collect();
    assert!(loaded.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    let preloaded = reg.preload();
    assert_eq!(preloaded.len(), 1);
    assert!(Arc::ptr_eq(
        preloaded[0].1.as_ref().unwrap(),
        &reg.get("alias").unwrap()
    ));
    assert_eq!(reg.get("alias").unwrap().name(), "alias");
    assert!(matches!(
        reg.get("org/nothing"),
        Err(TokensError::UnknownModel(_))
    ));
    assert!(matches!(
        reg.get("org/broken"),
        Err(TokensError::ModelLoad { .. })
    ));
    assert!(matches!(
        reg.get("org/broken"),
        Err(TokensError::ModelLoad { .. })
    ));
    assert_eq!(
        reg.loaded_models(),
        vec!["alias", "org/broken", "org/model"]
    );
}

#[test]
fn get_loaded_answers_only_after_a_load() {
    let root = TempDir::new("loaded");
    put_tokenizer(&root, "org/model");
    root.write("org/broken/tokenizer.json", "{ not json");
    let reg = TokenizerRegistry::new([], vec![root.path().to_path_buf()], Default::default());
    assert!(reg.get_loaded("org/model").is_none());
    assert!(reg.get_loaded("org/unknown").is_none());
    let t = reg.get("org/model").unwrap();
    let again = reg.get_loaded("org/model").unwrap().unwrap();
    assert!(Arc::ptr_eq(&t, &again));
    assert!(reg.get("org/broken").is_err());
    assert!(matches!(
        reg.get_loaded("org/broken"),
        Some(Err(TokensError::ModelLoad { .. }))
    ));
}
