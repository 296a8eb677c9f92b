//! Decoding limits and errors, shared by the pickle and msgpack decoders.
//!
//! Both decoders read bytes straight off the network, so a peer controls every length
//! field, every nesting level and (in pickle) every memo reference. Three rules keep a
//! hostile or broken peer from crashing the server or making it allocate without bound:
//!
//! - every length is checked against the bytes actually left in the input before
//!   anything is read or allocated ([`Input`], over zodb's shared pickle reader), so a
//!   4 GiB length in a 20-byte message fails as [`DecodeError::Truncated`];
//! - container nesting is capped by [`Limits::max_depth`]. The decoders themselves keep
//!   nested containers on explicit stacks, but whoever then encodes, clones, compares
//!   or drops the [`Value`](crate::Value) recurses once per level;
//! - the amount of decoded data is capped by [`Limits::max_items`], charged for what is
//!   *produced*, not for what is read: a pickle memo reference that copies a large
//!   container is charged the full size of the copy.

use zodb::pickle::{Reader, Truncated};

/// Bounds applied while decoding one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest allowed container nesting: a flat tuple is depth 1, a tuple inside it depth
    /// 2, and so on (a pickle MARK also counts as one level while it is open).
    ///
    /// The decoders never recurse, but encoding, cloning, comparing and dropping a
    /// [`Value`](crate::Value) do, once per level. Keep this in the hundreds: it is what
    /// keeps a deeply nested message from overflowing a thread's stack later on.
    pub max_depth: usize,
    /// Most values a single message may produce, counting every scalar and container.
    /// Pickle also charges the values copied out of its memo, the values it hashes for
    /// dict keys and set elements, and a cloned text string about one item per
    /// `size_of::<Value>()` bytes, so this bounds memory as well as the item count.
    pub max_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 256,
            max_items: 10_000_000,
        }
    }
}

impl Limits {
    /// These limits with the item budget cut to what a well-formed message of `len`
    /// bytes can produce, for decoding what an untrusted peer sent.
    ///
    /// Every value a ZEO peer sends costs at least one byte: msgpack has no references,
    /// and ZEO pickles in fast mode, without memo. Only memo references (`BINGET`) and
    /// `DUP` copy what was already built, for two bytes or one, and a few hundred bytes
    /// of them can ask for millions of values: without this, a message of 200 KB could
    /// make the decoder build the full [`Limits::max_items`] (about 600 MB). The budget
    /// is charged about twice per value (when built and when copied out), hence four
    /// items per byte, plus slack for tiny messages.
    pub fn for_message(&self, len: usize) -> Limits {
        Limits {
            max_items: self
                .max_items
                .min(len.saturating_mul(4).saturating_add(1024)),
            ..*self
        }
    }

    /// The depth of a container's children, if a container at `depth` may be opened.
    /// `depth` is the number of containers already around it (0 at the top level).
    pub(crate) fn enter(&self, depth: usize) -> Result<usize, DecodeError> {
        let inner = depth + 1;
        if inner > self.max_depth {
            Err(DecodeError::DepthLimit(self.max_depth))
        } else {
            Ok(inner)
        }
    }
}

/// Why a message could not be decoded. Any of these means the peer sent something a
/// well-behaved ZEO client or server does not send; the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("truncated input")]
    Truncated,
    #[error("{0} bytes of trailing data after the end of the message")]
    TrailingData(usize),
    #[error("unknown or unsupported pickle opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    #[error("unsupported msgpack type 0x{0:02x} (ext types and 0xc1 are not allowed)")]
    UnsupportedMarker(u8),
    #[error("unsupported pickle protocol {0}")]
    UnsupportedProtocol(u8),
    #[error("global {0}.{1} is not allowed")]
    DisallowedGlobal(String, String),
    #[error("nesting deeper than the limit of {0}")]
    DepthLimit(usize),
    #[error("message larger than the limit of {0} items")]
    SizeLimit(usize),
    #[error("memo index {0} was never stored")]
    BadMemoIndex(u64),
    #[error("pickle stack underflow")]
    StackUnderflow,
    #[error("invalid UTF-8 (or an unpaired surrogate) in text")]
    InvalidUtf8,
    #[error("integer does not fit in 64 bits")]
    IntegerOverflow,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Counts produced items against [`Limits::max_items`].
#[derive(Debug)]
pub(crate) struct Budget {
    left: usize,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Budget { left: max, max }
    }

    pub(crate) fn charge(&mut self, items: usize) -> Result<(), DecodeError> {
        self.left = self
            .left
            .checked_sub(items)
            .ok_or(DecodeError::SizeLimit(self.max))?;
        Ok(())
    }
}

/// A bounds-checked cursor over one message: zodb's shared pickle
/// [`Reader`](zodb::pickle::Reader), which both decoders (msgpack included) read
/// through, with its error reported as [`DecodeError::Truncated`]. No length from the
/// wire is trusted beyond the bytes actually present and nothing is allocated from an
/// unchecked length.
#[derive(Debug)]
pub(crate) struct Input<'a>(Reader<'a>);

impl From<Truncated> for DecodeError {
    fn from(_: Truncated) -> DecodeError {
        DecodeError::Truncated
    }
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input(Reader::new(data))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.0.remaining()
    }

    pub(crate) fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.0.byte()?)
    }

    /// The next `len` bytes. `len` is a `u64` so that any length field, whatever its
    /// width, can be passed without a lossy cast.
    pub(crate) fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        Ok(self.0.take(len)?)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.0.array()?)
    }

    /// The bytes up to the next `\n`, which is consumed but not returned.
    pub(crate) fn line(&mut self) -> Result<&'a [u8], DecodeError> {
        Ok(self.0.line()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_never_reads_past_the_end() {
        let mut input = Input::new(b"ab\ncd");
        assert_eq!(input.take(u64::MAX), Err(DecodeError::Truncated));
        assert_eq!(input.take(6), Err(DecodeError::Truncated));
        assert_eq!(input.line().unwrap(), b"ab");
        assert_eq!(input.line(), Err(DecodeError::Truncated));
        assert_eq!(input.array::<2>().unwrap(), *b"cd");
        assert_eq!(input.byte(), Err(DecodeError::Truncated));
        assert_eq!(input.remaining(), 0);
    }

    #[test]
    fn budget_and_depth() {
        let mut budget = Budget::new(3);
        budget.charge(2).unwrap();
        budget.charge(1).unwrap();
        assert_eq!(budget.charge(1), Err(DecodeError::SizeLimit(3)));
        let limits = Limits {
            max_depth: 2,
            max_items: 10,
        };
        assert_eq!(limits.enter(0), Ok(1));
        assert_eq!(limits.enter(1), Ok(2));
        assert_eq!(limits.enter(2), Err(DecodeError::DepthLimit(2)));
    }
}

/// Helpers shared by the pickle and msgpack tests.
#[cfg(test)]
pub(crate) mod testing {
    use bytes::Bytes;

    use crate::{DecodeError, Limits, Value};

    /// Bytes from hex, ignoring whitespace.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let pairs = digits.chunks_exact(2);
        assert!(pairs.remainder().is_empty(), "odd number of hex digits");
        pairs
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// Bytes from a capture transcript: hex pairs, with `'quoted'` runs of ASCII text
    /// standing for their bytes, as written in `zeo-wire.md`.
    pub(crate) fn wire(spec: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, part) in spec.split('\'').enumerate() {
            if n % 2 == 1 {
                out.extend_from_slice(part.as_bytes());
            } else {
                out.extend(hex(part));
            }
        }
        out
    }

    /// Splits a captured frame into its payload, checking the length prefix.
    pub(crate) fn payload(frame: &[u8]) -> &[u8] {
        let (len, payload) = frame.split_at(4);
        assert_eq!(
            u32::from_be_bytes(len.try_into().unwrap()) as usize,
            payload.len(),
            "frame length prefix disagrees with the transcript"
        );
        payload
    }

    pub(crate) fn i(v: i64) -> Value {
        Value::Int(v)
    }
    /// A float given by its bits, so fixtures are exact.
    pub(crate) fn f(bits: u64) -> Value {
        Value::Float(f64::from_bits(bits))
    }
    pub(crate) fn b(v: &[u8]) -> Value {
        Value::Bytes(Bytes::copy_from_slice(v))
    }
    pub(crate) fn s(v: &str) -> Value {
        Value::Str(v.to_owned())
    }
    pub(crate) fn t(v: Vec<Value>) -> Value {
        Value::Tuple(v)
    }
    pub(crate) fn l(v: Vec<Value>) -> Value {
        Value::List(v)
    }
    pub(crate) fn d(v: Vec<(Value, Value)>) -> Value {
        Value::Dict(v)
    }
    pub(crate) fn set(v: Vec<Value>) -> Value {
        Value::Set(v)
    }
    pub(crate) fn prefix(state: Value) -> Value {
        Value::Object {
            module: "ZopeUndo.Prefix".into(),
            name: "Prefix".into(),
            state: Box::new(state),
        }
    }

    /// Decodes `input` on a thread with a small stack and no depth limit, and returns
    /// how deeply nested the result is: proof that decoding does not recurse. The
    /// value is taken apart without recursion too, since dropping it would recurse.
    pub(crate) fn depth_on_small_stack(
        decode: fn(&[u8], &Limits) -> Result<Value, DecodeError>,
        input: Vec<u8>,
    ) -> usize {
        let limits = Limits {
            max_depth: usize::MAX,
            ..Limits::default()
        };
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut deepest = 0;
                let mut todo = vec![(decode(&input, &limits).unwrap(), 0)];
                while let Some((value, depth)) = todo.pop() {
                    deepest = deepest.max(depth);
                    match value {
                        Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
                            todo.extend(items.into_iter().map(|item| (item, depth + 1)));
                        }
                        Value::Dict(items) => {
                            for (k, v) in items {
                                todo.push((k, depth + 1));
                                todo.push((v, depth + 1));
                            }
                        }
                        Value::Object { state, .. } => todo.push((*state, depth + 1)),
                        _ => {}
                    }
                }
                deepest
            })
            .unwrap()
            .join()
            .unwrap()
    }

    /// FNV-1a, to compare long encodings with Python's without pasting them whole.
    pub(crate) fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// xorshift64*: a deterministic generator, so failures reproduce.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed.max(1))
        }

        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform-ish in `0..n` (`n > 0`).
        pub(crate) fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).expect("below n, a usize")
        }

        /// [`Rng::below`] as an int.
        pub(crate) fn int_below(&mut self, n: usize) -> i64 {
            i64::try_from(self.below(n)).expect("a small bound")
        }

        /// Any i64: the next draw's bits.
        pub(crate) fn int(&mut self) -> i64 {
            i64::from_le_bytes(self.next().to_le_bytes())
        }

        /// Any byte: the next draw's low byte.
        pub(crate) fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    /// Integers at every encoding boundary of both marshallings.
    pub(crate) const BOUNDARY_INTS: &[i64] = &[
        0,
        1,
        31,
        32,
        127,
        128,
        255,
        256,
        65535,
        65536,
        4_294_967_295,
        4_294_967_296,
        -1,
        -31,
        -32,
        -33,
        -128,
        -129,
        -255,
        -256,
        -32768,
        -32769,
        -65535,
        -65536,
        -65537,
        i32::MAX as i64,
        i32::MIN as i64,
        i32::MAX as i64 + 1,
        i32::MIN as i64 - 1,
        1 << 39,
        -(1 << 39),
        -(1 << 39) - 1,
        1 << 55,
        -(1 << 55),
        i64::MAX,
        i64::MIN,
        i64::MAX - 1,
        i64::MIN + 1,
    ];

    /// A random value. `pickle` allows everything; otherwise only what msgpack can
    /// carry (no sets, no objects, no lists since they come back as tuples, and
    /// text or bytes map keys). Dict keys and set elements are distinct, floats are
    /// never NaN, so decoding must give back an equal value.
    pub(crate) fn random_value(rng: &mut Rng, depth: usize, pickle: bool) -> Value {
        let kinds = if depth == 0 { 6 } else { 11 };
        match rng.below(kinds) {
            0 => Value::None,
            1 => Value::Bool(rng.below(2) == 1),
            2 => match rng.below(3) {
                0 => i(BOUNDARY_INTS[rng.below(BOUNDARY_INTS.len())]),
                1 => i(rng.int()),
                _ => i(rng.int_below(300) - 150),
            },
            3 => {
                let x = f64::from_bits(rng.next());
                Value::Float(if x.is_nan() { 0.5 } else { x })
            }
            4 => {
                let len = [0, 1, 255, 256, 300][rng.below(5)];
                b(&(0..len).map(|_| rng.byte()).collect::<Vec<u8>>())
            }
            5 => {
                let len = [0, 1, 31, 32, 255, 256][rng.below(6)];
                let chars = ['a', 'é', '日', '😀', '\n', '\\', '\0'];
                Value::Str((0..len).map(|_| chars[rng.below(chars.len())]).collect())
            }
            6 | 7 => t(children(rng, depth, pickle)),
            8 if pickle => l(children(rng, depth, pickle)),
            8 => t(children(rng, depth, pickle)),
            9 => {
                let n = rng.below(20);
                d((0..n)
                    .map(|k| {
                        let key = if pickle && k % 3 == 1 {
                            i(i64::try_from(k).expect("below 20") * 1000)
                        } else if k % 3 == 2 {
                            b(format!("b{k}").as_bytes())
                        } else {
                            s(&format!("k{k}"))
                        };
                        (key, random_value(rng, depth - 1, pickle))
                    })
                    .collect())
            }
            _ if pickle && rng.below(2) == 0 => set((0..rng.int_below(5)).map(i).collect()),
            _ if pickle => prefix(random_value(rng, depth - 1, pickle)),
            _ => Value::None,
        }
    }

    fn children(rng: &mut Rng, depth: usize, pickle: bool) -> Vec<Value> {
        let n = [0, 1, 2, 3, 4, 15, 16, 17][rng.below(8)];
        (0..n)
            .map(|_| random_value(rng, depth - 1, pickle))
            .collect()
    }

    /// Flips, inserts, deletes or truncates bytes of `msg`.
    pub(crate) fn mutate(rng: &mut Rng, msg: &[u8]) -> Vec<u8> {
        let mut out = msg.to_vec();
        for _ in 0..1 + rng.below(4) {
            let pos = if out.is_empty() {
                0
            } else {
                rng.below(out.len())
            };
            match rng.below(6) {
                0 | 1 if !out.is_empty() => out[pos] = rng.byte(),
                2 if !out.is_empty() => out[pos] ^= 1 << rng.below(8),
                3 => out.insert(pos, rng.byte()),
                4 if !out.is_empty() => {
                    out.remove(pos);
                }
                _ => out.truncate(pos),
            }
        }
        out
    }
}
