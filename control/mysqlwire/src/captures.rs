//! Real packets for the tests, captured (whole, headers included) with a TCP tap between the
//! MariaDB 10.11.19 server and its `mariadb` client (Connector/C 3.3.20) on Debian 12:
//! user `sluice`, password `secret`, database `test`. The client's auth response checks out
//! as mysql_native_password of `secret` over the greeting's 20-byte scramble.

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex")).collect()
}

/// Handshake v10 of a server with TLS configured (CLIENT_SSL set), connection id 3.
pub const GREETING: &str = "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100030000004271344c61232b4b00feff080200ff81150000000000001d000000793f6e2e376a3154323d796b006d7973716c5f6e61746976655f70617373776f726400";
/// The same server before TLS was configured: no CLIENT_SSL.
pub const GREETING_NO_TLS: &str = "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310004000000747e3f5e3d52642400fef7080200ff81150000000000001d00000021785e4b3c2a5e7b71464770006d7973716c5f6e61746976655f70617373776f726400";
/// `mariadb -usluice -psecret -D test --skip-ssl`: HandshakeResponse41 answering [`GREETING`].
pub const RESPONSE: &str = "d70000018ca2bf000000100021000000000000000000000000000000000000001d000000736c75696365001464318cb2609ab5872ac3eb1cd89c4532ee537f8e74657374006d7973716c5f6e61746976655f70617373776f7264007f035f6f73054c696e75780c5f636c69656e745f6e616d650a6c69626d617269616462045f7069640532343537370f5f636c69656e745f76657273696f6e06332e332e3230095f706c6174666f726d067838365f36340c70726f6772616d5f6e616d65056d7973716c0c5f7365727665725f686f7374093132372e302e302e31";
/// `mariadb --ssl`: the SSLRequest (TLS's ClientHello followed it directly).
pub const SSL_REQUEST: &str = "2000000184aabf000000100021000000000000000000000000000000000000001d000000";
/// The server's OK to [`RESPONSE`]: autocommit, session state changed (schema `test`).
pub const AUTH_OK: &str = "1000000200000002400000000701050474657374";
/// COM_QUERY `KILL QUERY 99`, then the server's ERR, then COM_QUIT.
pub const KILL_QUERY: &str = "0e000000034b494c4c205155455259203939";
pub const UNKNOWN_THREAD: &str = "1e000001ff4604234859303030556e6b6e6f776e207468726561642069643a203939";
pub const QUIT: &str = "0100000001";
/// Wrong password (the anonymous ''@'localhost' user matched first).
pub const ACCESS_DENIED: &str = "4a000002ff15042332383030304163636573732064656e69656420666f7220757365722027736c756963652740276c6f63616c686f73742720287573696e672070617373776f72643a2059455329";
