//! Bounded little-endian field access. Every read names its offset and returns `None` past the end
//! of the slice, so a short or hostile buffer can never cause a panic.

/// Reads `N` bytes at `off`, or `None` if the slice is too short.
pub fn array_at<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    let s = buf.get(off..end)?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Some(out)
}

/// Little-endian `u8` at `off`.
pub fn u8_at(buf: &[u8], off: usize) -> Option<u8> {
    buf.get(off).copied()
}

/// Little-endian `u16` at `off`.
pub fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    array_at(buf, off).map(u16::from_le_bytes)
}

/// Little-endian `u32` at `off`.
pub fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    array_at(buf, off).map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off`.
pub fn u64_at(buf: &[u8], off: usize) -> Option<u64> {
    array_at(buf, off).map(u64::from_le_bytes)
}

/// A writer over a fixed, zero-initialised buffer (an Identify page, a log page). Writes past the
/// end are dropped rather than panicking; builders size their buffers from the layout so that does
/// not happen, and unit tests check the offsets.
#[derive(Debug, Clone)]
pub struct PageWriter {
    buf: Vec<u8>,
}

impl PageWriter {
    /// A zeroed page of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self { buf: vec![0; len] }
    }

    /// Copies `bytes` to `off`, truncated at the end of the page.
    pub fn put(&mut self, off: usize, bytes: &[u8]) {
        if off >= self.buf.len() {
            return;
        }
        let n = bytes.len().min(self.buf.len() - off);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(off..off + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
    }

    /// Writes a byte.
    pub fn u8(&mut self, off: usize, v: u8) {
        self.put(off, &[v]);
    }

    /// Writes a little-endian `u16`.
    pub fn u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_le_bytes());
    }

    /// Writes a little-endian `u32`.
    pub fn u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_le_bytes());
    }

    /// Writes a little-endian `u64`.
    pub fn u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_le_bytes());
    }

    /// Writes a little-endian 128-bit counter.
    pub fn u128(&mut self, off: usize, v: u128) {
        self.put(off, &v.to_le_bytes());
    }

    /// Writes an ASCII string into a field of `width` bytes, padded with `pad` (spaces for
    /// Identify strings and discovery addresses, NUL for NQNs).
    pub fn str_padded(&mut self, off: usize, width: usize, s: &str, pad: u8) {
        let mut field = vec![pad; width];
        let n = s.len().min(width);
        if let (Some(dst), Some(src)) = (field.get_mut(..n), s.as_bytes().get(..n)) {
            dst.copy_from_slice(src);
        }
        self.put(off, &field);
    }

    /// The finished page.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded() {
        let b = [1u8, 2, 3];
        assert_eq!(u16_at(&b, 1), Some(0x0302));
        assert_eq!(u16_at(&b, 2), None);
        assert_eq!(u64_at(&b, usize::MAX), None);
        assert_eq!(u8_at(&b, 3), None);
    }

    #[test]
    fn writer_truncates_instead_of_panicking() {
        let mut w = PageWriter::new(4);
        w.u64(0, u64::MAX);
        w.str_padded(2, 8, "abc", b' ');
        assert_eq!(w.into_vec(), vec![0xff, 0xff, b'a', b'b']);
    }
}
