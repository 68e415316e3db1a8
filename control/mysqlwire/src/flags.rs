//! Capability and server status flags as bit-set newtypes (hand-written rather than the
//! `bitflags` crate: the few operations needed do not justify the dependency). Unknown bits are
//! kept, so a proxy relaying a peer's flags does not drop ones it has no name for.

use std::ops::{BitAnd, BitOr, Not};

macro_rules! bitset {
    ($name:ident, $int:ty) => {
        impl $name {
            pub const fn empty() -> Self {
                $name(0)
            }
            pub const fn from_bits(bits: $int) -> Self {
                $name(bits)
            }
            pub const fn bits(self) -> $int {
                self.0
            }
            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
            pub const fn union(self, other: Self) -> Self {
                $name(self.0 | other.0)
            }
            pub const fn intersection(self, other: Self) -> Self {
                $name(self.0 & other.0)
            }
            pub const fn difference(self, other: Self) -> Self {
                $name(self.0 & !other.0)
            }
            pub fn insert(&mut self, other: Self) {
                self.0 |= other.0;
            }
            pub fn remove(&mut self, other: Self) {
                self.0 &= !other.0;
            }
            pub fn set(&mut self, other: Self, on: bool) {
                if on {
                    self.insert(other)
                } else {
                    self.remove(other)
                }
            }
        }
        impl BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }
        impl BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                self.intersection(rhs)
            }
        }
        impl Not for $name {
            type Output = Self;
            fn not(self) -> Self {
                $name(!self.0)
            }
        }
    };
}

/// Capability flags (`CLIENT_*`), the lower and upper 16 bits of the handshake's 32.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CapabilityFlags(u32);
bitset!(CapabilityFlags, u32);

impl CapabilityFlags {
    /// MariaDB calls this bit CLIENT_MYSQL; a MariaDB server clears it to say its extended
    /// capabilities are in the handshake's reserved bytes.
    pub const LONG_PASSWORD: Self = Self(1);
    pub const FOUND_ROWS: Self = Self(1 << 1);
    pub const LONG_FLAG: Self = Self(1 << 2);
    pub const CONNECT_WITH_DB: Self = Self(1 << 3);
    pub const NO_SCHEMA: Self = Self(1 << 4);
    pub const COMPRESS: Self = Self(1 << 5);
    pub const ODBC: Self = Self(1 << 6);
    pub const LOCAL_FILES: Self = Self(1 << 7);
    pub const IGNORE_SPACE: Self = Self(1 << 8);
    pub const PROTOCOL_41: Self = Self(1 << 9);
    pub const INTERACTIVE: Self = Self(1 << 10);
    pub const SSL: Self = Self(1 << 11);
    pub const IGNORE_SIGPIPE: Self = Self(1 << 12);
    pub const TRANSACTIONS: Self = Self(1 << 13);
    pub const RESERVED: Self = Self(1 << 14);
    pub const SECURE_CONNECTION: Self = Self(1 << 15);
    pub const MULTI_STATEMENTS: Self = Self(1 << 16);
    pub const MULTI_RESULTS: Self = Self(1 << 17);
    pub const PS_MULTI_RESULTS: Self = Self(1 << 18);
    pub const PLUGIN_AUTH: Self = Self(1 << 19);
    pub const CONNECT_ATTRS: Self = Self(1 << 20);
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: Self = Self(1 << 21);
    pub const CAN_HANDLE_EXPIRED_PASSWORDS: Self = Self(1 << 22);
    pub const SESSION_TRACK: Self = Self(1 << 23);
    pub const DEPRECATE_EOF: Self = Self(1 << 24);
    pub const OPTIONAL_RESULTSET_METADATA: Self = Self(1 << 25);
    pub const ZSTD_COMPRESSION_ALGORITHM: Self = Self(1 << 26);
    pub const QUERY_ATTRIBUTES: Self = Self(1 << 27);
    pub const MULTI_FACTOR_AUTHENTICATION: Self = Self(1 << 28);
    pub const SSL_VERIFY_SERVER_CERT: Self = Self(1 << 30);
    pub const REMEMBER_OPTIONS: Self = Self(1 << 31);

    pub const fn lower(self) -> u16 {
        self.0 as u16
    }

    pub const fn upper(self) -> u16 {
        (self.0 >> 16) as u16
    }

    pub const fn from_halves(lower: u16, upper: u16) -> Self {
        Self(lower as u32 | (upper as u32) << 16)
    }
}

impl std::fmt::Debug for CapabilityFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CapabilityFlags({:#010x})", self.0)
    }
}

/// Server status flags (`SERVER_*`) of OK and EOF packets and the handshake.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StatusFlags(u16);
bitset!(StatusFlags, u16);

impl StatusFlags {
    pub const IN_TRANS: Self = Self(1);
    pub const AUTOCOMMIT: Self = Self(1 << 1);
    pub const MORE_RESULTS_EXISTS: Self = Self(1 << 3);
    pub const NO_GOOD_INDEX_USED: Self = Self(1 << 4);
    pub const NO_INDEX_USED: Self = Self(1 << 5);
    pub const CURSOR_EXISTS: Self = Self(1 << 6);
    pub const LAST_ROW_SENT: Self = Self(1 << 7);
    pub const DB_DROPPED: Self = Self(1 << 8);
    pub const NO_BACKSLASH_ESCAPES: Self = Self(1 << 9);
    pub const METADATA_CHANGED: Self = Self(1 << 10);
    pub const QUERY_WAS_SLOW: Self = Self(1 << 11);
    pub const PS_OUT_PARAMS: Self = Self(1 << 12);
    pub const IN_TRANS_READONLY: Self = Self(1 << 13);
    pub const SESSION_STATE_CHANGED: Self = Self(1 << 14);
}

impl std::fmt::Debug for StatusFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatusFlags({:#06x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_and_set_operations() {
        let c = CapabilityFlags::PROTOCOL_41 | CapabilityFlags::PLUGIN_AUTH | CapabilityFlags::SSL;
        assert_eq!(c.bits(), 0x0008_0A00);
        assert_eq!((c.lower(), c.upper()), (0x0A00, 0x0008));
        assert_eq!(CapabilityFlags::from_halves(c.lower(), c.upper()), c);
        assert!(c.contains(CapabilityFlags::SSL | CapabilityFlags::PROTOCOL_41));
        assert!(!c.contains(CapabilityFlags::SSL | CapabilityFlags::DEPRECATE_EOF));
        let mut d = c;
        d.remove(CapabilityFlags::SSL);
        assert_eq!(d, c.difference(CapabilityFlags::SSL));
        d.set(CapabilityFlags::SSL, true);
        assert_eq!(d, c);
        assert_eq!(c & !CapabilityFlags::SSL, c.difference(CapabilityFlags::SSL));
    }
}
