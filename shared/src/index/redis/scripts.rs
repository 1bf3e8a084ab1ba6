//! The Lua scripts of `lua/`, compiled into the crate, and how they are called.
//!
//! Scripts are invoked with EVALSHA inside pipelines. `redis::Script` only
//! reloads a missing script on a single `invoke_async`, not inside a pipeline,
//! so [`load_all`] runs SCRIPT LOAD on every master at connect (and whenever a
//! new master appears), and the executor (`cluster.rs`) reloads and retries
//! once when a pipeline answers NOSCRIPT (a Redis restart or `SCRIPT FLUSH`).

use crate::index::IndexError;
use redis::{Cmd, Script, aio::ConnectionManager};
use std::sync::LazyLock;

/// The three write scripts, each touching one slot per call, and the
/// read-only lookup script (single node only: it reads a whole prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    Store,
    Remove,
    ClearPod,
    Lookup,
}

impl ScriptKind {
    pub const ALL: [ScriptKind; 4] = [
        ScriptKind::Store,
        ScriptKind::Remove,
        ScriptKind::ClearPod,
        ScriptKind::Lookup,
    ];

    fn script(self) -> &'static Script {
        &SCRIPTS[self as usize]
    }

    /// The script's SHA1, as EVALSHA wants it.
    pub fn sha(self) -> &'static str {
        self.script().get_hash()
    }

    /// The script's source.
    pub fn source(self) -> &'static str {
        SOURCES[self as usize]
    }

    /// `EVALSHA <sha> <#keys> keys... args...`.
    pub fn evalsha(self, keys: &[String], args: &[&str]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.sha()).arg(keys.len()).arg(keys).arg(args);
        cmd
    }
}

const SOURCES: [&str; 4] = [
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/store.lua")),
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/remove.lua")),
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/clear_pod.lua")),
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/lookup.lua")),
];

/// Hashing is done once; `Script` computes the SHA1 in `new`.
static SCRIPTS: LazyLock<[Script; 4]> = LazyLock::new(|| SOURCES.map(Script::new));

/// SCRIPT LOAD every script on one node, in one round trip, and check that the
/// server computed the same SHA1 (a mismatch would make every EVALSHA fail).
pub async fn load_all(conn: &mut ConnectionManager) -> Result<(), IndexError> {
    let mut pipe = redis::pipe();
    for kind in ScriptKind::ALL {
        pipe.cmd("SCRIPT").arg("LOAD").arg(kind.source());
    }
    let shas: Vec<String> = pipe.query_async(conn).await?;
    for (kind, sha) in ScriptKind::ALL.iter().zip(&shas) {
        if sha != kind.sha() {
            return Err(IndexError::Reply(format!(
                "SCRIPT LOAD of {kind:?} returned SHA1 {sha}, expected {}",
                kind.sha()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_distinct_and_hashed() {
        let shas: Vec<&str> = ScriptKind::ALL.iter().map(|k| k.sha()).collect();
        assert!(shas.iter().all(|s| s.len() == 40));
        assert_ne!(shas[0], shas[1]);
        assert_ne!(shas[1], shas[2]);
        assert_ne!(shas[2], shas[3]);
        assert!(ScriptKind::Store.source().contains("layout 1"));
        assert!(ScriptKind::Lookup.source().contains("READ-ONLY"));
    }

    #[test]
    fn evalsha_declares_keys() {
        let keys = vec!["a".to_owned(), "b".to_owned()];
        let cmd = ScriptKind::Remove.evalsha(&keys, &["x"]);
        let packed = String::from_utf8_lossy(&cmd.get_packed_command()).into_owned();
        assert!(packed.contains("EVALSHA"));
        assert!(packed.contains(ScriptKind::Remove.sha()));
        assert!(
            packed.contains("\r\n2\r\n"),
            "number of keys missing: {packed:?}"
        );
    }
}
