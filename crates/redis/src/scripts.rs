//! The Lua scripts of `lua/`, compiled into the crate, and how they are called.
//!
//! Scripts are invoked with EVALSHA inside pipelines. `redis::Script` only
//! reloads a missing script on a single `invoke_async`, not inside a pipeline,
//! so [`load_all`] runs SCRIPT LOAD on every master at connect (and whenever a
//! new master appears), and the executor (`cluster.rs`) reloads and retries
//! once when a pipeline answers NOSCRIPT (a Redis restart or `SCRIPT FLUSH`).

use crate::Error;
use redis::{Cmd, Script, aio::ConnectionManager};
use std::sync::LazyLock;

/// The three write scripts, each touching one slot per call, and the two
/// read-only lookup scripts: `Lookup` reads a whole prompt on a single node
/// (its keys declared); `LookupNode` is the same bisection over the blocks
/// one cluster master holds, its names passed in ARGV because they span
/// many slots (`allow-cross-slot-keys`, Redis 7.0 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    Store,
    Remove,
    ClearPod,
    Lookup,
    LookupNode,
}

/// What a node's scripts allow, found when they are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptSupport {
    /// Redis 7.0 or later: script flags (`#!lua`) and `EVALSHA_RO` are
    /// understood, so [`ScriptKind::LookupNode`] is loaded and lookups may
    /// run read-only (on a replica too). Older servers reject the shebang.
    pub read_only: bool,
}

impl ScriptKind {
    pub const ALL: [ScriptKind; 5] = [
        ScriptKind::Store,
        ScriptKind::Remove,
        ScriptKind::ClearPod,
        ScriptKind::Lookup,
        ScriptKind::LookupNode,
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

/// `lookup.lua` over ARGV instead of KEYS: the same text, so the same
/// bisection, run on one cluster master over the blocks it holds. The flags
/// let a script read undeclared keys of several slots of its own node (a
/// key of another node is an error, and the lookup falls back to rounds).
const LOOKUP_NODE: &str = concat!(
    "#!lua flags=no-writes,allow-cross-slot-keys\n",
    "local KEYS = ARGV\n",
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../lua/lookup.lua")),
);

const SOURCES: [&str; 5] = [
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../lua/store.lua")),
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../lua/remove.lua")),
    include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../lua/clear_pod.lua"
    )),
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../lua/lookup.lua")),
    LOOKUP_NODE,
];

/// Hashing is done once; `Script` computes the SHA1 in `new`.
static SCRIPTS: LazyLock<[Script; 5]> = LazyLock::new(|| SOURCES.map(Script::new));

/// SCRIPT LOAD every script on one node, in one round trip, and check that the
/// server computed the same SHA1 (a mismatch would make every EVALSHA fail).
/// Only [`ScriptKind::LookupNode`] may fail to load (a server older than
/// 7.0); that is reported in the [`ScriptSupport`], not as an error.
pub async fn load_all(conn: &mut ConnectionManager) -> Result<ScriptSupport, Error> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for kind in ScriptKind::ALL {
        pipe.cmd("SCRIPT").arg("LOAD").arg(kind.source());
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut support = ScriptSupport { read_only: true };
    for (kind, reply) in ScriptKind::ALL.iter().zip(replies) {
        let sha = match reply {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::SimpleString(s) => s,
            redis::Value::ServerError(e) if *kind == ScriptKind::LookupNode => {
                tracing::info!(error = ?e, "Redis older than 7.0: cluster lookups take rounds, not one script per master");
                support.read_only = false;
                continue;
            }
            redis::Value::ServerError(e) if e.code() == "NOPERM" => {
                return Err(Error::Config(format!(
                    "this Redis user may not run SCRIPT LOAD ({e:?}): allow +script|load (docs/redis-acl.md)"
                )));
            }
            other => {
                return Err(Error::Reply(format!(
                    "SCRIPT LOAD of {kind:?} answered {other:?}"
                )));
            }
        };
        if sha != kind.sha() {
            return Err(Error::Reply(format!(
                "SCRIPT LOAD of {kind:?} returned SHA1 {sha}, expected {}",
                kind.sha()
            )));
        }
    }
    Ok(support)
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
        assert_ne!(shas[3], shas[4]);
        assert!(
            ScriptKind::LookupNode
                .source()
                .starts_with("#!lua flags=no-writes")
        );
        assert!(ScriptKind::LookupNode.source().contains("READ-ONLY"));
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
