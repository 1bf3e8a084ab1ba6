//! What one simulated pod is: a model on a GPU ([`ModelSpec`], which sizes
//! the KV cache the way vLLM's memory profiling does) and how long an
//! engine step takes on it ([`CostModel`], a roofline over the step's
//! GEMMs and its decode attention).
//!
//! Every constant is derived in `docs/engine-model.md`, with its source.

/// Bytes in a MiB: vLLM logs memory in GiB/MiB (powers of two).
const MIB: u64 = 1 << 20;

/// Llama-3.1-8B (config.json): 32 layers, hidden 4096, 32 query heads and 8
/// KV heads of 128 dims, MLP 14336, vocabulary 128256.
mod llama31_8b {
    pub const LAYERS: u64 = 32;
    pub const HIDDEN: u64 = 4096;
    pub const KV_HEADS: u64 = 8;
    pub const HEAD_DIM: u64 = 128;
    pub const INTERMEDIATE: u64 = 14336;
    pub const VOCAB: u64 = 128_256;
    /// bf16.
    pub const DTYPE_BYTES: u64 = 2;

    /// Parameters of the per-layer projections (q, k, v, o, gate, up, down),
    /// all layers: what every token multiplies through.
    pub const LINEAR_PARAMS: u64 = LAYERS
        * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * INTERMEDIATE);
    /// The output projection (untied from the input embedding in Llama 3.1).
    pub const LM_HEAD_PARAMS: u64 = HIDDEN * VOCAB;
}

/// A model served on one GPU: what sizes vLLM's KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Hugging Face id, used as vLLM's `model_name` metric label.
    pub name: &'static str,
    pub gpu: &'static str,
    /// K and V of one token over all layers: 2 * layers * kv_heads *
    /// head_dim * dtype bytes.
    pub kv_bytes_per_token: u64,
    /// What vLLM reports after loading the weights ("Model loading took
    /// 14.99 GiB").
    pub weight_bytes: u64,
    /// Device memory as CUDA reports it (the base of
    /// `--gpu-memory-utilization`).
    pub gpu_memory_bytes: u64,
    /// Non-KV memory beyond the weights that vLLM's profiling run finds:
    /// the peak activation of a `max_num_batched_tokens` forward pass plus
    /// non-torch allocations (NCCL, cuBLAS workspaces).
    pub activation_reserve_bytes: u64,
}

impl ModelSpec {
    /// `meta-llama/Llama-3.1-8B-Instruct` in bf16 on one H100 SXM 80GB.
    pub fn llama31_8b_h100() -> ModelSpec {
        use llama31_8b::*;
        ModelSpec {
            name: "meta-llama/Llama-3.1-8B-Instruct",
            gpu: "H100-SXM-80GB",
            kv_bytes_per_token: 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES,
            // 14.99 GiB, vLLM's own report for this model.
            weight_bytes: 15_350 * MIB,
            // 79.19 GiB, what CUDA reports for an H100 80GB HBM3.
            gpu_memory_bytes: 81_091 * MIB,
            // 2.13 GiB (torch peak 1.89 + non-torch 0.25) at 8192 batched tokens.
            activation_reserve_bytes: 2_181 * MIB,
        }
    }

    /// vLLM's `num_gpu_blocks` for this utilization (0..1] and block size:
    /// (utilization * memory - weights - activation reserve) / (KV bytes of
    /// one block), rounded down; 0 when nothing is left for the cache or the
    /// arguments make no sense (vLLM refuses to start then).
    pub fn num_gpu_blocks(&self, gpu_memory_utilization: f64, block_size: usize) -> usize {
        if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) || block_size == 0 {
            return 0;
        }
        let requested = gpu_memory_utilization * self.gpu_memory_bytes as f64;
        let available = requested - self.weight_bytes as f64 - self.activation_reserve_bytes as f64;
        let block_bytes = (self.kv_bytes_per_token * block_size as u64) as f64;
        if available <= 0.0 || block_bytes <= 0.0 {
            return 0;
        }
        (available / block_bytes).floor() as usize
    }
}

/// Step time of one engine step, as a roofline: the GEMMs of all tokens
/// scheduled in the step take the longer of their FLOPs at the achieved
/// FLOP rate and one read of the weights at the achieved bandwidth (one
/// step reads the weights once, however many tokens it batches); decode
/// attention reads every context token's KV once; a fixed overhead covers
/// scheduling, launches and sampling.
///
/// So prefill costs in proportion to the uncached tokens computed (above a
/// few hundred tokens a step is compute-bound), decode is nearly free per
/// sequence until the batch's FLOPs outgrow the weight read (~190 sequences
/// here), and long decode contexts add their KV reads.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_flops: f64,
    /// Achieved fraction of `peak_flops` on the step's GEMMs (model FLOPs
    /// utilization).
    pub mfu: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// Achieved fraction of `hbm_bytes_per_s`.
    pub bandwidth_efficiency: f64,
    /// GEMM FLOPs per token through the layers (2 per linear parameter).
    pub flops_per_token: f64,
    /// FLOPs of the output projection for one sampled token.
    pub lm_head_flops_per_seq: f64,
    /// Weight bytes a step streams from HBM (layers and output projection;
    /// the embedding is gathered row by row, not read whole).
    pub weight_read_bytes: f64,
    /// KV bytes one context token occupies (read once per decode step).
    pub kv_bytes_per_token: f64,
    /// Fixed cost of a step, seconds.
    pub step_overhead_s: f64,
}

impl CostModel {
    /// Llama-3.1-8B-Instruct (bf16) on one H100 SXM 80GB.
    pub fn llama31_8b_h100() -> CostModel {
        use llama31_8b::*;
        CostModel {
            peak_flops: 989.4e12,
            mfu: 0.5,
            hbm_bytes_per_s: 3.35e12,
            bandwidth_efficiency: 0.8,
            flops_per_token: (2 * LINEAR_PARAMS) as f64,
            lm_head_flops_per_seq: (2 * LM_HEAD_PARAMS) as f64,
            weight_read_bytes: ((LINEAR_PARAMS + LM_HEAD_PARAMS) * DTYPE_BYTES) as f64,
            kv_bytes_per_token: (2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES) as f64,
            step_overhead_s: 1e-3,
        }
    }

    /// Seconds one engine step takes: `prefill_tokens` computed this step
    /// (uncached), `decode_seqs` sequences decoding one token each, and
    /// `context_tokens` the KV tokens those decode sequences attend over.
    /// Zero for an empty step (no step runs).
    pub fn step_time(&self, prefill_tokens: u64, decode_seqs: u64, context_tokens: u64) -> f64 {
        if prefill_tokens == 0 && decode_seqs == 0 {
            return 0.0;
        }
        let flop_rate = (self.peak_flops * self.mfu).max(f64::MIN_POSITIVE);
        let byte_rate = (self.hbm_bytes_per_s * self.bandwidth_efficiency).max(f64::MIN_POSITIVE);
        let gemm_flops = (prefill_tokens + decode_seqs) as f64 * self.flops_per_token
            + decode_seqs as f64 * self.lm_head_flops_per_seq;
        let gemm_s = (gemm_flops / flop_rate).max(self.weight_read_bytes / byte_rate);
        let attention_s = context_tokens as f64 * self.kv_bytes_per_token / byte_rate;
        self.step_overhead_s + gemm_s + attention_s
    }

    /// Prefill tokens/s of one unloaded step of `chunk` tokens (llm-d's R).
    pub fn prefill_tokens_per_s(&self, chunk: u64) -> f64 {
        let t = self.step_time(chunk, 0, 0);
        if t > 0.0 { chunk as f64 / t } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_constants_match_the_published_config() {
        let m = ModelSpec::llama31_8b_h100();
        // 2 (K and V) * 32 layers * 8 heads * 128 dims * 2 bytes.
        assert_eq!(m.kv_bytes_per_token, 131_072);
        // The embedding, layers, norms and head add up to the 8.03B of the
        // model card (8,030,261,248 parameters).
        let norms = 2 * 4096 * 32 + 4096;
        assert_eq!(
            llama31_8b::LINEAR_PARAMS + 2 * llama31_8b::LM_HEAD_PARAMS + norms,
            8_030_261_248
        );
    }

    #[test]
    fn kv_capacity_at_0_9_is_vllms_formula() {
        let m = ModelSpec::llama31_8b_h100();
        // (0.9 * 81091 MiB - 15350 MiB - 2181 MiB) / 2 MiB per block
        // = (72981.9 - 17531) / 2 = 27725.45.
        assert_eq!(m.num_gpu_blocks(0.9, 16), 27_725);
        // Block size 32 halves it (rounded down).
        assert_eq!(m.num_gpu_blocks(0.9, 32), 13_862);
        assert_eq!(m.num_gpu_blocks(0.2, 16), 0, "weights do not fit");
        assert_eq!(m.num_gpu_blocks(f64::NAN, 16), 0);
        assert_eq!(m.num_gpu_blocks(1.5, 16), 0);
        assert_eq!(m.num_gpu_blocks(0.9, 0), 0);
    }

    #[test]
    fn step_time_is_the_roofline() {
        let c = CostModel::llama31_8b_h100();
        assert_eq!(c.step_time(0, 0, 1000), 0.0);
        // An 8192-token chunk: 8192 * 2 * 6,979,321,856 FLOPs at half of
        // 989.4 TFLOP/s, plus 1 ms.
        let expected = 8192.0 * 13_958_643_712.0 / 494.7e12 + 1e-3;
        assert!((c.step_time(8192, 0, 0) - expected).abs() < 1e-12);
        assert!((expected - 0.232_148).abs() < 1e-5);
        assert!((c.prefill_tokens_per_s(8192) - 8192.0 / expected).abs() < 1e-6);
        // One decode sequence is bound by the weight read: 15.01e9 bytes at
        // 80% of 3.35 TB/s = 5.60 ms, plus 1 ms, plus its context's KV.
        let weights = 2.0 * (6_979_321_856.0 + 525_336_576.0) / 2.68e12;
        let kv = 1000.0 * 131_072.0 / 2.68e12;
        assert!((c.step_time(0, 1, 1000) - (1e-3 + weights + kv)).abs() < 1e-12);
        // 64 decodes still fit under the weight read; 512 do not.
        assert!((c.step_time(0, 64, 0) - (1e-3 + weights)).abs() < 1e-12);
        let flops_512 = 512.0 * (13_958_643_712.0 + 1_050_673_152.0) / 494.7e12;
        assert!((c.step_time(0, 512, 0) - (1e-3 + flops_512)).abs() < 1e-12);
    }
}
