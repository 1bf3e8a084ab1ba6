//! The request body, buffered to end of stream: routing needs the whole
//! prompt, and Envoy only forwards what the picker streams back, so the body
//! is held here between the two.
//!
//! The cap protects the scorer's memory from one oversized upload; past it
//! the client gets 413 and the rest of the body is never buffered.

/// Default cap on a buffered request body (prompts of a few hundred thousand
/// tokens fit; vLLM's own default request limit is far larger than useful).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

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
}

impl BodyBuffer {
    /// An empty buffer that accepts at most `max` bytes. `expected` (the
    /// client's `content-length`, when sent) presizes it, bounded by `max`.
    pub fn new(max: usize, expected: Option<usize>) -> Self {
        let capacity = expected.unwrap_or(0).min(max);
        Self {
            buf: Vec::with_capacity(capacity),
            max,
        }
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
    fn presize_is_bounded() {
        let b = BodyBuffer::new(100, Some(1 << 30));
        assert!(b.buf.capacity() >= 100 && b.buf.capacity() < 1 << 20);
    }
}
