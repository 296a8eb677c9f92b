//! Protocol-3 pickle output, byte for byte what zodbpickle's C `Pickler` writes for the
//! same values.
//!
//! ZEO and ZODB both stop at protocol 3 (zodbpickle's highest), so every writer in zeors
//! emits it: ZEO messages, `Data.fs.index` files and conflict-resolved records. Only the
//! opcode choices live here; what a value is (and whether it is memoized) is the
//! caller's business. Nothing is memoized: the output is what a pickler in `fast` mode
//! writes, which any unpickler reads.

use super::op;

/// Python pickles lists and dicts in batches of this many items.
const BATCH_SIZE: usize = 1000;

/// Appends opcodes to a byte vector.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    /// An opcode that takes no argument (`MARK`, `STOP`, `REDUCE`, `BINPERSID`, ...).
    pub fn op(&mut self, opcode: u8) {
        self.out.push(opcode);
    }

    /// `PROTO version`, the start of every protocol ≥ 2 pickle.
    pub fn proto(&mut self, version: u8) {
        self.out.extend_from_slice(&[op::PROTO, version]);
    }

    pub fn none(&mut self) {
        self.out.push(op::NONE);
    }

    pub fn bool(&mut self, b: bool) {
        self.out.push(if b { op::NEWTRUE } else { op::NEWFALSE });
    }

    /// Ints as CPython's `save_long`: the unsigned one- and two-byte forms for small
    /// non-negative values, BININT for the rest of the i32 range, LONG1 beyond with the
    /// shortest little-endian two's complement (what `pickle.encode_long` produces).
    pub fn int(&mut self, i: i128) {
        if let Ok(b) = u8::try_from(i) {
            self.out.extend_from_slice(&[op::BININT1, b]);
        } else if let Ok(w) = u16::try_from(i) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&w.to_le_bytes());
        } else if let Ok(d) = i32::try_from(i) {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&d.to_le_bytes());
        } else {
            // Drop high bytes that only repeat the sign of the byte below them.
            let bytes = i.to_le_bytes();
            let mut len = bytes.len();
            while len > 1 {
                let (top, below) = (bytes[len - 1], bytes[len - 2]);
                let redundant =
                    (top == 0x00 && below & 0x80 == 0) || (top == 0xff && below & 0x80 != 0);
                if !redundant {
                    break;
                }
                len -= 1;
            }
            self.out.extend_from_slice(&[op::LONG1, len as u8]);
            self.out.extend_from_slice(&bytes[..len]);
        }
    }

    pub fn float(&mut self, f: f64) {
        self.out.push(op::BINFLOAT);
        self.out.extend_from_slice(&f.to_be_bytes());
    }

    /// Python 3 `bytes` (protocol 3).
    ///
    /// # Panics
    ///
    /// At 4 GiB or more, which protocol 3 cannot express.
    pub fn bytes(&mut self, b: &[u8]) {
        match u8::try_from(b.len()) {
            Ok(len) => self.out.extend_from_slice(&[op::SHORT_BINBYTES, len]),
            Err(_) => {
                self.out.push(op::BINBYTES);
                self.out.extend_from_slice(&len_u32(b.len()).to_le_bytes());
            }
        }
        self.out.extend_from_slice(b);
    }

    /// Python 3 `str`. Protocol 3 has no SHORT_BINUNICODE: every string is a BINUNICODE.
    ///
    /// # Panics
    ///
    /// At 4 GiB or more, which protocol 3 cannot express.
    pub fn text(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&len_u32(s.len()).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// `GLOBAL module name`: a class or function by reference.
    pub fn global(&mut self, module: &str, name: &str) {
        debug_assert!(!module.contains('\n') && !name.contains('\n'));
        self.out.push(op::GLOBAL);
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
    }

    /// A tuple of `items`, each written by `each`: EMPTY_TUPLE, TUPLE1..3 after the
    /// items, or MARK … TUPLE for longer ones.
    pub fn tuple<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        match items.len() {
            0 => self.out.push(op::EMPTY_TUPLE),
            n @ 1..=3 => {
                items.iter().for_each(|item| each(self, item));
                self.out.push(op::TUPLE1 + (n as u8 - 1));
            }
            _ => {
                self.out.push(op::MARK);
                items.iter().for_each(|item| each(self, item));
                self.out.push(op::TUPLE);
            }
        }
    }

    /// A list: EMPTY_LIST then its items as CPython's `batch_list_exact` writes them.
    pub fn list<T>(&mut self, items: &[T], each: impl FnMut(&mut Self, &T)) {
        self.out.push(op::EMPTY_LIST);
        self.appends(items, each);
    }

    /// List items appended to the list on top of the stack, as CPython's
    /// `batch_list_exact`: one item is a lone APPEND; more are written in MARK … APPENDS
    /// batches of up to 1000, even if the last batch holds a single item. (The
    /// pure-Python pickler would use APPEND for such a trailing item; zodbpickle uses the
    /// C code.)
    pub fn appends<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        match items {
            [] => {}
            [item] => {
                each(self, item);
                self.out.push(op::APPEND);
            }
            _ => {
                for batch in items.chunks(BATCH_SIZE) {
                    self.out.push(op::MARK);
                    batch.iter().for_each(|item| each(self, item));
                    self.out.push(op::APPENDS);
                }
            }
        }
    }

    /// A dict: EMPTY_DICT then its items, `each` writing one key and its value. Batched
    /// as CPython's `batch_dict_exact` does: like list items, except that its loop runs
    /// again after every full batch, so a dict whose size is a multiple of 1000 ends with
    /// an empty MARK SETITEMS.
    pub fn dict<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        self.out.push(op::EMPTY_DICT);
        match items {
            [] => {}
            [item] => {
                each(self, item);
                self.out.push(op::SETITEM);
            }
            _ => {
                let mut last_batch = 0;
                for batch in items.chunks(BATCH_SIZE) {
                    self.out.push(op::MARK);
                    batch.iter().for_each(|item| each(self, item));
                    self.out.push(op::SETITEMS);
                    last_batch = batch.len();
                }
                if last_batch == BATCH_SIZE {
                    self.out.extend_from_slice(&[op::MARK, op::SETITEMS]);
                }
            }
        }
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("pickle protocol 3 cannot encode bytes or text of 4 GiB or more")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut Writer::new(&mut out));
        out
    }

    #[test]
    fn ints_as_save_long() {
        let cases: &[(i128, &[u8])] = &[
            (0, b"K\x00"),
            (255, b"K\xff"),
            (256, b"M\x00\x01"),
            (65535, b"M\xff\xff"),
            (65536, b"J\x00\x00\x01\x00"),
            (-1, b"J\xff\xff\xff\xff"),
            (i32::MAX.into(), b"J\xff\xff\xff\x7f"),
            (0x8000_0000, b"\x8a\x05\x00\x00\x00\x80\x00"),
            (-2_147_483_649, b"\x8a\x05\xff\xff\xff\x7f\xff"),
            (
                u64::MAX.into(),
                b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00",
            ),
            (i64::MIN.into(), b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"),
        ];
        for &(i, bytes) in cases {
            assert_eq!(written(|w| w.int(i)), bytes, "{i}");
        }
    }

    #[test]
    fn containers() {
        let k = |w: &mut Writer, i: &i128| w.int(*i);
        assert_eq!(written(|w| w.tuple(&[] as &[i128], k)), b")");
        assert_eq!(written(|w| w.tuple(&[1, 2], k)), b"K\x01K\x02\x86");
        assert_eq!(
            written(|w| w.tuple(&[1, 2, 3, 4], k)),
            b"(K\x01K\x02K\x03K\x04t"
        );
        assert_eq!(written(|w| w.list(&[7], k)), b"]K\x07a");
        assert_eq!(written(|w| w.list(&[7, 8], k)), b"](K\x07K\x08e");
        let pair = |w: &mut Writer, (a, b): &(i128, i128)| {
            w.int(*a);
            w.int(*b);
        };
        assert_eq!(written(|w| w.dict(&[(1, 2)], pair)), b"}K\x01K\x02s");
        let full: Vec<(i128, i128)> = (0..1000).map(|i| (i, i)).collect();
        assert!(written(|w| w.dict(&full, pair)).ends_with(b"u(u"));
        assert_eq!(written(|w| w.global("a.b", "C")), b"ca.b\nC\n");
        assert_eq!(written(|w| w.bytes(b"xy")), b"C\x02xy");
        assert_eq!(written(|w| w.text("é")), b"X\x02\x00\x00\x00\xc3\xa9");
    }
}
