//! vLLM KV-event decoding (placeholder until the decoder lands).
