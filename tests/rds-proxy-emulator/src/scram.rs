//! A minimal SCRAM-SHA-256 client (RFC 5802 / RFC 7677) for logging in to the backend with the
//! user's stored secret, as RDS Proxy does with the secret it fetches from Secrets Manager.
//!
//! No channel binding: the backend hop is plain TCP, so the gs2 header is always `n,,`. The user
//! name is sent empty because PostgreSQL takes it from the startup packet and ignores this one.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::sigv4::hmac_sha256 as hmac;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// "n,," base64-encoded: the gs2 header echoed back in client-final.
const GS2_HEADER_B64: &str = "biws";
/// PBKDF2 runs on the server's say-so; bound it so a misconfigured backend cannot pin a CPU.
const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed server-first-message")]
    MalformedServerFirst,
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("iteration count {0} is out of range")]
    BadIterations(u32),
    #[error("server reported error {0:?}")]
    ServerError(String),
    #[error("malformed server-final-message")]
    MalformedServerFinal,
    #[error("server signature does not match: the backend does not know the password")]
    BadServerSignature,
}

/// Client state after client-first has been sent.
#[derive(Debug, Clone)]
pub struct ScramClient {
    nonce: String,
    client_first_bare: String,
}

/// What the server must prove in server-final.
#[derive(Debug)]
pub struct ServerFinalCheck {
    server_signature: [u8; 32],
}

impl ScramClient {
    pub fn random() -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        Self::with_nonce("", &B64.encode(raw))
    }

    fn with_nonce(user: &str, nonce: &str) -> Self {
        ScramClient { nonce: nonce.to_owned(), client_first_bare: format!("n={user},r={nonce}") }
    }

    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers server-first with client-final. Expensive (PBKDF2): run it off the async workers.
    pub fn client_final(&self, server_first: &[u8], password: &str) -> Result<(String, ServerFinalCheck), ScramError> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| ScramError::MalformedServerFirst)?;
        let mut attrs = server_first.split(',');
        let mut next =
            |name: &str| attrs.next().and_then(|a| a.strip_prefix(name)).ok_or(ScramError::MalformedServerFirst);
        let nonce = next("r=")?;
        let salt = B64.decode(next("s=")?).map_err(|_| ScramError::MalformedServerFirst)?;
        let iterations: u32 = next("i=")?.parse().map_err(|_| ScramError::MalformedServerFirst)?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::BadIterations(iterations));
        }

        // Passwords are used as UTF-8 without SASLprep; that is the identity for ASCII secrets.
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let without_proof = format!("c={GS2_HEADER_B64},r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(client_signature).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(&salted, b"Server Key");
        let check = ServerFinalCheck { server_signature: hmac(&server_key, auth_message.as_bytes()) };
        Ok((format!("{without_proof},p={}", B64.encode(proof)), check))
    }
}

impl ServerFinalCheck {
    /// Verifies server-final, proving the backend really holds the password's verifier.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::MalformedServerFinal)?;
        if let Some(err) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(err.to_owned()));
        }
        let signature = text
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::MalformedServerFinal)?;
        if bool::from(signature.ct_eq(&self.server_signature)) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3.
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";

    #[test]
    fn rfc7677_exchange() {
        let client = ScramClient::with_nonce("user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (fin, check) = client.client_final(SERVER_FIRST.as_bytes(), "pencil").unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(check.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(()));
        assert_eq!(
            check.verify(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::BadServerSignature)
        );
        assert_eq!(check.verify(b"e=invalid-proof"), Err(ScramError::ServerError("invalid-proof".into())));
    }

    #[test]
    fn rejects_foreign_nonce_and_garbage() {
        let client = ScramClient::with_nonce("", "abc");
        assert_eq!(client.client_final(b"r=xyz123,s=AAAA,i=1", "pw").unwrap_err(), ScramError::NonceMismatch);
        assert_eq!(client.client_final(b"r=abc1,s=AAAA,i=0", "pw").unwrap_err(), ScramError::BadIterations(0));
        assert_eq!(client.client_final(b"\xff", "pw").unwrap_err(), ScramError::MalformedServerFirst);
        assert!(ScramClient::random().client_first().starts_with("n,,n=,r="));
    }
}
