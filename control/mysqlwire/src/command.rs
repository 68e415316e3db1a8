//! Command-phase recognition: the first byte of a client's command packet, and a parser for
//! the `KILL [QUERY|CONNECTION] <id>` statement a client sends on a second connection to cancel
//! work on the first (what `mysql`'s Ctrl-C does).

use crate::wire::Reader;
use crate::{malformed, CapabilityFlags, Error};

pub const COM_QUIT: u8 = 0x01;
pub const COM_INIT_DB: u8 = 0x02;
pub const COM_QUERY: u8 = 0x03;
pub const COM_PROCESS_KILL: u8 = 0x0C;
pub const COM_PING: u8 = 0x0E;

/// A client command, borrowing from its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Quit,
    /// The statement text as sent (in the connection's character set).
    Query(&'a [u8]),
    InitDb(&'a [u8]),
    Ping,
    /// The pre-8.0 kill command (`mysql_kill()`): kills the connection with this id.
    ProcessKill(u32),
    /// Any other command, by its first byte.
    Other(u8),
}

impl<'a> Command<'a> {
    /// Reads a command packet. `caps` are the agreed capabilities: with CLIENT_QUERY_ATTRIBUTES
    /// a COM_QUERY starts with its attribute counts, and queries that carry attributes are
    /// refused (Sluice only reads statements it answers itself, and does not offer the flag).
    pub fn parse(payload: &'a [u8], caps: CapabilityFlags) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        Ok(match r.u8("command")? {
            COM_QUIT => Command::Quit,
            COM_PING => Command::Ping,
            COM_INIT_DB => Command::InitDb(r.rest()),
            COM_PROCESS_KILL => Command::ProcessKill(r.u32("connection id")?),
            COM_QUERY => {
                if caps.contains(CapabilityFlags::QUERY_ATTRIBUTES) {
                    let params = r.lenenc_int("query parameter count")?;
                    r.lenenc_int("query parameter set count")?;
                    if params != 0 {
                        return Err(Error::Unsupported { what: "query attributes" });
                    }
                }
                Command::Query(r.rest())
            }
            other => Command::Other(other),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillKind {
    /// `KILL QUERY`: stop the statement, keep the connection.
    Query,
    /// `KILL` or `KILL CONNECTION`: end the connection.
    Connection,
}

/// A parsed `KILL` statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    pub kind: KillKind,
    pub id: u64,
}

/// Parses `KILL [QUERY | CONNECTION] <id>`, keywords in any case, any whitespace between the
/// words and around the statement, and an optional trailing `;`. Anything else is refused,
/// comments and expressions included: the id names someone else's session, so only the plain
/// form whose meaning is certain is accepted.
pub fn parse_kill(sql: &[u8]) -> Result<Kill, Error> {
    let not_kill = || malformed("KILL statement");
    let mut s = trim(sql);
    if let Some(rest) = s.strip_suffix(b";") {
        s = trim(rest);
    }
    let mut words = s.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    if !words.next().is_some_and(|w| w.eq_ignore_ascii_case(b"KILL")) {
        return Err(not_kill());
    }
    let (kind, id) = match (words.next(), words.next(), words.next()) {
        (Some(k), Some(id), None) if k.eq_ignore_ascii_case(b"QUERY") => (KillKind::Query, id),
        (Some(k), Some(id), None) if k.eq_ignore_ascii_case(b"CONNECTION") => (KillKind::Connection, id),
        (Some(id), None, None) => (KillKind::Connection, id),
        _ => return Err(not_kill()),
    };
    if id.is_empty() || !id.iter().all(u8::is_ascii_digit) {
        return Err(not_kill());
    }
    let id = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok()).ok_or_else(not_kill)?;
    Ok(Kill { kind, id })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commands_by_first_byte() {
        let none = CapabilityFlags::empty();
        assert_eq!(Command::parse(b"\x01", none), Ok(Command::Quit));
        assert_eq!(Command::parse(b"\x03KILL QUERY 7", none), Ok(Command::Query(b"KILL QUERY 7")));
        assert_eq!(Command::parse(b"\x02shop", none), Ok(Command::InitDb(b"shop")));
        assert_eq!(Command::parse(b"\x0e", none), Ok(Command::Ping));
        assert_eq!(Command::parse(b"\x0c\x2a\x00\x00\x00", none), Ok(Command::ProcessKill(42)));
        assert_eq!(Command::parse(b"\x0c\x2a", none), Err(Error::Truncated { what: "connection id" }));
        assert_eq!(Command::parse(b"\x16stmt", none), Ok(Command::Other(0x16)));
        assert_eq!(Command::parse(b"", none), Err(Error::Truncated { what: "command" }));
    }

    #[test]
    fn query_attributes_prefix() {
        let qa = CapabilityFlags::QUERY_ATTRIBUTES;
        assert_eq!(Command::parse(b"\x03\x00\x01KILL 3", qa), Ok(Command::Query(b"KILL 3")));
        assert_eq!(Command::parse(b"\x03\x01\x01\x00", qa), Err(Error::Unsupported { what: "query attributes" }));
        // Without the flag the same bytes are the statement.
        assert_eq!(
            Command::parse(b"\x03\x00\x01KILL 3", CapabilityFlags::empty()),
            Ok(Command::Query(b"\x00\x01KILL 3"))
        );
    }

    #[test]
    fn kill_forms() {
        let q = |id| Ok(Kill { kind: KillKind::Query, id });
        let c = |id| Ok(Kill { kind: KillKind::Connection, id });
        assert_eq!(parse_kill(b"KILL QUERY 12"), q(12));
        assert_eq!(parse_kill(b"kill query 12"), q(12));
        assert_eq!(parse_kill(b"  \tKiLl\n\r QuErY   12 ;  "), q(12));
        assert_eq!(parse_kill(b"KILL QUERY 12;"), q(12));
        assert_eq!(parse_kill(b"KILL CONNECTION 5"), c(5));
        assert_eq!(parse_kill(b"KILL 5"), c(5));
        assert_eq!(parse_kill(b"KILL 18446744073709551615"), c(u64::MAX));
    }

    #[test]
    fn kill_refusals() {
        for bad in [
            &b""[..],
            b"KILL",
            b"KILL QUERY",
            b"KILL QUERY -1",
            b"KILL QUERY +1",
            b"KILL QUERY 1 2",
            b"KILL QUERY 1;;",
            b"KILL QUERY 0x10",
            b"KILL QUERY 18446744073709551616",
            b"KILL QUERY CONNECTION_ID()",
            b"KILL QUERY 1 /* c */",
            b"KILL /* c */ QUERY 1",
            b"KILLQUERY 1",
            b"KILL QUERYS 1",
            b"KILL HARD QUERY 1",
            // MariaDB: a query id, not a connection id.
            b"KILL QUERY ID 1",
            b"KILL USER app",
            b"SELECT 1",
            b"KILL QUERY 1; DROP TABLE t",
            "KILL QUERY \u{0661}".as_bytes(),
        ] {
            assert_eq!(parse_kill(bad), Err(malformed("KILL statement")), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest! {
        #[test]
        fn kill_roundtrip(query in any::<bool>(), id in any::<u64>(), ws in "[ \t\r\n]{1,4}", semi in any::<bool>()) {
            let kw = if query { "query" } else { "CONNECTION" };
            let sql = format!("{ws}KILL{ws}{kw}{ws}{id}{ws}{}", if semi { ";" } else { "" });
            let kind = if query { KillKind::Query } else { KillKind::Connection };
            prop_assert_eq!(parse_kill(sql.as_bytes()), Ok(Kill { kind, id }));
        }

        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..48), caps in any::<u32>()) {
            let _ = parse_kill(&b);
            let _ = Command::parse(&b, CapabilityFlags::from_bits(caps));
        }
    }
}
