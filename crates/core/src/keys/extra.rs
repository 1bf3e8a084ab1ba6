//! Extra keys: what besides the tokens makes two blocks different caches.
//!
//! Defined once here and used by both services, so the ingester (from an
//! event's `lora_name`) and the scorer (from the request's model naming an
//! adapter, and its `cache_salt`) key the same blocks identically.
//!
//! The shape follows vLLM's own `extra_keys` tuple: LoRA keys first, then the
//! cache salt, which only the first block carries. A block with neither is
//! hashed with `null`. For the cache salt this is exactly what vLLM hashes.
//! For LoRA, vLLM's own extra key also depends on the adapter's path, which a
//! router cannot know, so LoRA blocks are keyed with the adapter name alone
//! (the same value vLLM publishes in the event's `extra_keys`); the ingester
//! therefore counts LoRA blocks as "engine hash differs from key", as expected.

/// The extra keys of one request (scorer) or one stored chain (ingester).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraKeys<'a> {
    /// LoRA adapter name, when the blocks were computed with an adapter.
    pub lora: Option<&'a str>,
    /// vLLM's `cache_salt` (first block only).
    pub cache_salt: Option<&'a str>,
}

impl<'a> ExtraKeys<'a> {
    pub const NONE: ExtraKeys<'static> = ExtraKeys {
        lora: None,
        cache_salt: None,
    };

    pub fn lora(name: &'a str) -> Self {
        ExtraKeys {
            lora: Some(name),
            cache_salt: None,
        }
    }

    /// The extra keys of block `index` of a chain (0 = first block), written
    /// into `buf`; `None` means CBOR null.
    pub fn for_block<'b>(&self, index: usize, buf: &'b mut [&'a str; 2]) -> Option<&'b [&'a str]> {
        let mut n = 0;
        if let Some(l) = self.lora {
            buf[n] = l;
            n += 1;
        }
        if index == 0
            && let Some(s) = self.cache_salt
        {
            buf[n] = s;
            n += 1;
        }
        if n == 0 { None } else { Some(&buf[..n]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salt_only_on_first_block_after_lora() {
        let e = ExtraKeys {
            lora: Some("a"),
            cache_salt: Some("s"),
        };
        let mut buf = [""; 2];
        assert_eq!(e.for_block(0, &mut buf), Some(&["a", "s"][..]));
        assert_eq!(e.for_block(1, &mut buf), Some(&["a"][..]));
        let s = ExtraKeys {
            lora: None,
            cache_salt: Some("s"),
        };
        assert_eq!(s.for_block(0, &mut buf), Some(&["s"][..]));
        assert_eq!(s.for_block(1, &mut buf), None);
        assert_eq!(ExtraKeys::NONE.for_block(0, &mut buf), None);
    }
}
