//! Plain commands on the master that owns one key, for bookkeeping outside
//! the block layout (the ingester's epoch, keying and model registry): one
//! wave on that key's slot, with the same recovery (MOVED, reconnect,
//! NOSCRIPT) as index writes. Every command of a call must touch only that
//! key (or keys of its slot).

use super::cluster::Call;
use super::{Error, RedisIndex, slots};
use redis::{Cmd, Value};

impl RedisIndex {
    /// Runs `cmds` in order on the master owning `key`; their replies.
    pub async fn run_at_key(&self, key: &str, cmds: Vec<Cmd>) -> Result<Vec<Value>, Error> {
        let slot = slots::key_slot(key.as_bytes());
        let calls = cmds.into_iter().map(|cmd| Call { slot, cmd }).collect();
        Ok(self.conns.run(calls).await?.replies)
    }
}
