//! The one bounds-checked cursor every pickle decoder reads through.
//!
//! Invariant: no read goes past the end of the input, and no length taken from the input
//! is trusted before it has been compared with the bytes actually left, so a 4 GiB length
//! field in a 20-byte pickle fails as [`Truncated`] before anything is allocated. Lengths
//! are accepted as `u64` so that a length field of any width is passed without a lossy
//! cast.

/// The input ended inside a read. `at` is where that read began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pickle truncated at byte {at}")]
pub struct Truncated {
    pub at: usize,
}

/// A cursor over one pickle (or several back to back, as in a ZODB record).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    /// The whole input, including what was already read.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Offset of the next byte to read.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.data.len()
    }

    /// The next byte, without consuming it.
    pub fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    pub fn byte(&mut self) -> Result<u8, Truncated> {
        let b = *self.data.get(self.pos).ok_or(self.truncated())?;
        self.pos += 1;
        Ok(b)
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: u64) -> Result<&'a [u8], Truncated> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.remaining())
            .ok_or(self.truncated())?;
        let bytes = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    /// The next `N` bytes as an array (fixed-width arguments).
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let bytes = self.take(N as u64)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    /// An unsigned little-endian integer of `width` bytes (at most 8), the form of every
    /// binary length and memo-index argument.
    pub fn uint_le(&mut self, width: usize) -> Result<u64, Truncated> {
        assert!(width <= 8, "uint_le reads at most 8 bytes");
        let bytes = self.take(width as u64)?;
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(buf))
    }

    /// The bytes up to the next `\n`, which is consumed but not returned (the argument
    /// form of the text opcodes of protocol 0).
    pub fn line(&mut self) -> Result<&'a [u8], Truncated> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(self.truncated())?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn truncated(&self) -> Truncated {
        Truncated { at: self.pos }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reads_past_the_end() {
        let mut r = Reader::new(b"ab\ncd\x01\x02");
        assert_eq!(r.take(u64::MAX), Err(Truncated { at: 0 }));
        assert_eq!(r.take(9), Err(Truncated { at: 0 }));
        assert_eq!(r.line().unwrap(), b"ab");
        assert_eq!(r.pos(), 3);
        assert_eq!(r.array::<2>().unwrap(), *b"cd");
        assert_eq!(r.line(), Err(Truncated { at: 5 }));
        assert_eq!(r.uint_le(4), Err(Truncated { at: 5 }));
        assert_eq!(r.peek(), Some(1));
        assert_eq!(r.uint_le(2).unwrap(), 0x0201);
        assert!(r.at_end());
        assert_eq!(r.byte(), Err(Truncated { at: 7 }));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.data().len(), 7);
    }
}
