//! `host:port` as users and configs write it (a `postgres://` URI's authority is accepted too).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("bad port in {0:?}")]
    BadPort(String),
    #[error("bad address {0:?}")]
    BadAddress(String),
}

/// Splits `host[:port]` (an IPv6 host in brackets), with `default_port` when none is given.
pub fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), AddrError> {
    let s = s.trim_start_matches("postgres://").trim_start_matches("postgresql://");
    let s = s.split('/').next().unwrap_or_default();
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => {
            let port = p.parse().map_err(|_| AddrError::BadPort(s.to_owned()))?;
            Ok((h.trim_matches(['[', ']']).to_owned(), port))
        }
        None if !s.is_empty() => Ok((s.to_owned(), default_port)),
        _ => Err(AddrError::BadAddress(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("h.example:6432", 5432).unwrap(), ("h.example".into(), 6432));
        assert_eq!(split_host_port("h.example", 5432).unwrap(), ("h.example".into(), 5432));
        assert_eq!(split_host_port("postgres://h.example:6432/db", 1).unwrap(), ("h.example".into(), 6432));
        assert_eq!(split_host_port("[::1]:5433", 1).unwrap(), ("::1".into(), 5433));
        assert_eq!(split_host_port("h:notaport", 5432), Err(AddrError::BadPort("h:notaport".into())));
        assert_eq!(split_host_port("", 5432), Err(AddrError::BadAddress(String::new())));
    }
}
