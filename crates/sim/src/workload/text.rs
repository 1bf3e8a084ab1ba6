//! Deterministic prose over the simulator's vocabulary, measured in tokens
//! as it is written: every word and every punctuation mark is exactly one
//! token of [`SimTokenizer`], so "a 1,200-token question" is 1,200 tokens
//! of text, not an estimate.

use rand::Rng;

use super::tokenizer::SimTokenizer;

/// Writes text from a tokenizer's content words.
pub(crate) struct TextGen<'a> {
    tok: &'a SimTokenizer,
}

/// Index of "." and "," in the tokenizer's punctuation list.
const FULL_STOP: usize = 0;
const COMMA: usize = 1;

impl<'a> TextGen<'a> {
    pub(crate) fn new(tok: &'a SimTokenizer) -> TextGen<'a> {
        TextGen { tok }
    }

    /// `n` tokens of sentences (6 to 16 words, an occasional comma, a full
    /// stop). Marks never follow one another: two marks in a row would be
    /// one non-word run, hence one unknown token, and the count would drift.
    pub(crate) fn prose(&self, rng: &mut impl Rng, n: usize) -> String {
        let mut out = String::with_capacity(n * 7);
        self.push_prose(&mut out, rng, n);
        out
    }

    /// [`Self::prose`] appended to `out` (with a separating space when
    /// `out` is not empty).
    pub(crate) fn push_prose(&self, out: &mut String, rng: &mut impl Rng, n: usize) {
        let words = self.tok.content_words();
        let mut sentence_len = rng.random_range(6..=16usize);
        let mut in_sentence = 0usize;
        let mut after_mark = true;
        for i in 0..n {
            let last = i + 1 == n;
            let mark = if !after_mark && in_sentence >= sentence_len {
                Some(FULL_STOP)
            } else if !after_mark && !last && in_sentence >= 3 && rng.random_bool(0.08) {
                Some(COMMA)
            } else {
                None
            };
            match mark {
                Some(m) => {
                    out.push_str(self.tok.word(self.tok.punctuation_id(m)));
                    after_mark = true;
                    if m == FULL_STOP {
                        in_sentence = 0;
                        sentence_len = rng.random_range(6..=16usize);
                    }
                }
                None => {
                    if !out.is_empty() {
                        out.push(' ');
                    }
                    let w = words[rng.random_range(0..words.len())];
                    out.push_str(self.tok.word(w));
                    after_mark = false;
                    in_sentence += 1;
                }
            }
        }
    }

    /// `width` words that name `n` (its digits in base "number of content
    /// words", least significant first): texts starting with different
    /// serials differ from their first token, which is how generators make
    /// prompts that share nothing (or nothing beyond a chosen prefix).
    pub(crate) fn serial(&self, n: u64, width: usize) -> String {
        let words = self.tok.content_words();
        let base = words.len() as u64;
        let mut rest = n;
        let mut parts = Vec::with_capacity(width);
        for _ in 0..width {
            parts.push(self.tok.word(words[(rest % base) as usize]));
            rest /= base;
        }
        parts.join(" ")
    }

    /// A two-word serial for `n` followed by prose, `n_tokens` in all (at
    /// least the serial). Two-word serials are unique below 63.8 million.
    pub(crate) fn tagged(&self, n: u64, rng: &mut impl Rng, n_tokens: usize) -> String {
        let mut out = self.serial(n, 2);
        self.push_prose(&mut out, rng, n_tokens.saturating_sub(2));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn prose_is_exactly_n_tokens() {
        let tok = SimTokenizer::build();
        let g = TextGen::new(&tok);
        let mut rng = StdRng::seed_from_u64(7);
        for n in [0, 1, 2, 17, 500, 1_200] {
            let text = g.prose(&mut rng, n);
            let ids = tok.encode_completion(&text).expect("encode");
            assert_eq!(ids.len(), n + 1, "BOS + {n} tokens: {text:?}");
            assert!(!ids.contains(&0), "no unknown token in {text:?}");
        }
    }

    #[test]
    fn serials_differ_at_the_first_token_and_tagged_counts() {
        let tok = SimTokenizer::build();
        let g = TextGen::new(&tok);
        let first = |n: u64| tok.encode_completion(&g.serial(n, 2)).expect("encode")[1];
        assert_ne!(first(0), first(1));
        assert_ne!(first(7_989), first(7_990));
        // 7,990 content words: n and n + 7,990 share the first word only.
        let (a, b) = (
            tok.encode_completion(&g.serial(3, 2)).expect("encode"),
            tok.encode_completion(&g.serial(3 + 7_990, 2))
                .expect("encode"),
        );
        assert_eq!(a[1], b[1]);
        assert_ne!(a[2], b[2]);
        let mut rng = StdRng::seed_from_u64(1);
        let t = g.tagged(42, &mut rng, 300);
        assert_eq!(tok.encode_completion(&t).expect("encode").len(), 301);
        assert!(t.starts_with(&g.serial(42, 2)));
    }
}
