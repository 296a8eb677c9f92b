//! Object and transaction identifiers.
//!
//! Both are 8 opaque bytes on the wire and in Data.fs, big-endian so that byte order and
//! numeric order agree. Holding them as `u64` makes comparisons and arithmetic trivial.

use std::fmt;

/// An object id. Oid 0 is the database root.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Oid(pub u64);

/// A transaction id: a ZODB timestamp (see [`crate::timestamp`]), also an object's serial.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tid(pub u64);

macro_rules! id_common {
    ($t:ident) => {
        impl $t {
            /// The 8 big-endian bytes used on the wire and on disk.
            pub fn to_bytes(self) -> [u8; 8] {
                self.0.to_be_bytes()
            }

            /// Parses exactly 8 bytes; anything else is not an id.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                let arr: [u8; 8] = b.try_into().ok()?;
                Some($t(u64::from_be_bytes(arr)))
            }

            pub fn from_bytes(b: [u8; 8]) -> Self {
                $t(u64::from_be_bytes(b))
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:016x})", stringify!($t), self.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "0x{:016x}", self.0)
            }
        }
    };
}

id_common!(Oid);
id_common!(Tid);

impl Oid {
    /// The root object's oid.
    pub const ROOT: Oid = Oid(0);
}

impl Tid {
    /// `z64`: "no transaction", the last tid of an empty storage.
    pub const ZERO: Tid = Tid(0);
    /// `maxtid`: `loadBefore(oid, MAX)` loads the current revision.
    pub const MAX: Tid = Tid(0x7fff_ffff_ffff_ffff);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_order() {
        let a = Oid(1);
        assert_eq!(a.to_bytes(), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(Oid::from_slice(&a.to_bytes()), Some(a));
        assert_eq!(Oid::from_slice(&[1, 2, 3]), None);
        assert!(Tid(0x0100) > Tid(0x00ff));
        assert_eq!(format!("{}", Tid(0x03f5945817777777)), "0x03f5945817777777");
    }
}
