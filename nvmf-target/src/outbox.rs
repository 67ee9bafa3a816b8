//! The bytes a connection still has to send, in order, free of I/O.
//!
//! Small PDUs (response capsules, C2HData and R2T headers, digests) are encoded back to back into
//! one growing buffer, the *head*; data buffers (read data handed out by a bdev) are queued as
//! their own chunks without being copied. The socket side asks for [`IoSlice`]s covering as much
//! as is pending ([`Outbox::io_slices`]) and reports how many bytes the socket took
//! ([`Outbox::consume`]), so everything that is ready goes out in one `writev`.
//!
//! No allocation per PDU: the head buffer is reserved in large blocks and reclaimed in place once
//! the chunks cut from it have been written and dropped.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// The head buffer grows by this much at a time.
const HEAD_BLOCK: usize = 64 * 1024;
/// Room the head keeps free for the next PDUs: more than the largest header with digests.
const HEAD_SLACK: usize = 512;

/// Pending output of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Sealed chunks, oldest first; all of them precede `head`.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    chunk_bytes: usize,
    /// Encoded PDUs not yet sealed into a chunk; they follow every chunk.
    head: BytesMut,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// The buffer to encode the next small PDU into (appended after everything pending).
    pub fn buf(&mut self) -> &mut BytesMut {
        if self.head.capacity() - self.head.len() < HEAD_SLACK {
            self.head.reserve(HEAD_BLOCK);
        }
        &mut self.head
    }

    /// Appends a data buffer without copying it.
    pub fn push_data(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.seal();
        self.chunk_bytes += data.len();
        self.chunks.push_back(data);
    }

    /// Bytes pending.
    pub fn len(&self) -> usize {
        self.chunk_bytes + self.head.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the head's bytes into a chunk of their own.
    fn seal(&mut self) {
        if !self.head.is_empty() {
            let b = self.head.split().freeze();
            self.chunk_bytes += b.len();
            self.chunks.push_back(b);
        }
    }

    /// Fills `iov` with the pending bytes in order and returns how many slices it used.
    pub fn io_slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let head = (!self.head.is_empty()).then_some(&self.head[..]);
        let mut used = 0;
        for (slot, c) in iov.iter_mut().zip(self.chunks.iter().map(|b| &b[..]).chain(head)) {
            *slot = IoSlice::new(c);
            used += 1;
        }
        used
    }

    /// Drops the first `n` pending bytes (the socket took them).
    pub fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else { break };
            if front.len() <= n {
                n -= front.len();
                self.chunk_bytes -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                self.chunk_bytes -= n;
                n = 0;
            }
        }
        let n = n.min(self.head.len());
        self.head.advance(n);
    }

    /// Takes everything pending as chunks, in order.
    pub fn take(&mut self) -> Vec<Bytes> {
        self.seal();
        self.chunk_bytes = 0;
        self.chunks.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn flatten(o: &Outbox) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); 16];
        let n = o.io_slices(&mut iov);
        iov[..n].iter().flat_map(|s| s.to_vec()).collect()
    }

    #[test]
    fn order_is_kept_across_head_and_data_and_partial_writes() {
        let mut o = Outbox::new();
        o.buf().put_slice(b"hdr1");
        o.push_data(Bytes::from_static(b"DATA"));
        o.buf().put_slice(b"resp");
        assert_eq!(o.len(), 12);
        assert_eq!(flatten(&o), b"hdr1DATAresp");
        o.consume(6);
        assert_eq!(flatten(&o), b"TAresp");
        o.buf().put_slice(b"x");
        o.consume(3);
        assert_eq!(flatten(&o), b"espx");
        o.consume(4);
        assert!(o.is_empty());
        o.buf().put_slice(b"again");
        assert_eq!(o.take().concat(), b"again");
        assert!(o.is_empty());
    }

    #[test]
    fn iov_limit_is_respected() {
        let mut o = Outbox::new();
        for _ in 0..10 {
            o.buf().put_slice(b"h");
            o.push_data(Bytes::from_static(b"d"));
        }
        let mut iov = [IoSlice::new(&[]); 4];
        assert_eq!(o.io_slices(&mut iov), 4);
        o.consume(4);
        assert_eq!(o.len(), 16);
    }
}
