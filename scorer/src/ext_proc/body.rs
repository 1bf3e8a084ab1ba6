//! The request body, buffered to end of stream: routing needs the whole
//! prompt, and Envoy only forwards what the picker streams back, so the body
//! is held here between the two.
//!
//! The cap protects the scorer's memory from one oversized upload; past it
//! the client gets 413 and the rest of the body is never buffered.

/// Default cap on a buffered request body (prompts of a few hundred thousand
/// tokens fit; vLLM's own default request limit is far larger than useful).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Bytes buffered by all streams together, bounded (`--max-buffered-bytes`):
/// one body's cap alone lets 100 slow uploads of 15 MiB hold 1.5 GB.
#[derive(Debug, Clone)]
pub struct Budget {
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Self {
        Budget {
            used: Default::default(),
            max,
        }
    }

    /// Takes `n` bytes from the budget, or refuses (nothing taken).
    fn reserve(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.used
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Why a chunk was not buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// All streams' buffers together would pass the budget; the chunk is
    /// handed back (the caller routes without buffering).
    #[error("buffered bytes of all streams over the budget")]
    OverBudget,
}

/// The body grew past the configured cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request body exceeds {max} bytes")]
pub struct TooLarge {
    pub max: usize,
}

/// Request body chunks appended in arrival order.
#[derive(Debug)]
pub struct BodyBuffer {
    buf: Vec<u8>,
    max: usize,
    budget: Option<Budget>,
    /// Bytes taken from the budget (released on take and drop).
    reserved: usize,
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

impl BodyBuffer {
    /// An empty buffer that accepts at most `max` bytes. `expected` (the
    /// client's `content-length`, when sent) presizes it, bounded by `max`.
    pub fn new(max: usize, expected: Option<usize>) -> Self {
        let capacity = expected.unwrap_or(0).min(max);
        Self {
            buf: Vec::with_capacity(capacity),
            max,
            budget: None,
            reserved: 0,
        }
    }

    /// Also bounded by `budget`, shared with the other streams.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    fn release(&mut self) {
        if let Some(b) = &self.budget {
            b.release(std::mem::take(&mut self.reserved));
        }
    }

    /// Appends one chunk within the cap and the shared budget; over the
    /// budget the chunk comes back with the error.
    pub fn push_within_budget(&mut self, chunk: Vec<u8>) -> Result<(), (PushError, Vec<u8>)> {
        if self.buf.len().saturating_add(chunk.len()) > self.max {
            return Err((TooLarge { max: self.max }.into(), chunk));
        }
        if let Some(b) = &self.budget {
            if !b.reserve(chunk.len()) {
                return Err((PushError::OverBudget, chunk));
            }
            self.reserved += chunk.len();
        }
        self.push(chunk).map_err(|e| (e.into(), Vec::new()))
    }

    /// Appends one chunk. The first chunk is moved in rather than copied
    /// when nothing was presized (the common small-body case).
    pub fn push(&mut self, chunk: Vec<u8>) -> Result<(), TooLarge> {
        if self.buf.len().saturating_add(chunk.len()) > self.max {
            return Err(TooLarge { max: self.max });
        }
        if self.buf.capacity() == 0 {
            self.buf = chunk;
        } else {
            self.buf.extend_from_slice(&chunk);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The buffered body, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.release();
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_in_order_and_enforces_cap() {
        let mut b = BodyBuffer::new(10, None);
        b.push(b"abc".to_vec()).expect("fits");
        b.push(Vec::new()).expect("empty chunk");
        b.push(b"defg".to_vec()).expect("fits");
        assert_eq!(b.as_slice(), b"abcdefg");
        assert_eq!(b.push(b"hijk".to_vec()), Err(TooLarge { max: 10 }));
        b.push(b"hij".to_vec()).expect("exactly the cap");
        assert_eq!(b.take(), b"abcdefghij");
        assert!(b.is_empty());
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = Budget::new(10);
        let mut a = BodyBuffer::new(100, None).with_budget(budget.clone());
        let mut b = BodyBuffer::new(100, None).with_budget(budget.clone());
        a.push_within_budget(vec![1; 6]).expect("fits");
        let (err, back) = b.push_within_budget(vec![2; 6]).expect_err("over budget");
        assert_eq!((err, back.len()), (PushError::OverBudget, 6));
        b.push_within_budget(vec![2; 4]).expect("fits");
        assert_eq!(budget.used(), 10);
        assert_eq!(a.take().len(), 6);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn presize_is_bounded() {
        let b = BodyBuffer::new(100, Some(1 << 30));
        assert!(b.buf.capacity() >= 100 && b.buf.capacity() < 1 << 20);
    }
}
