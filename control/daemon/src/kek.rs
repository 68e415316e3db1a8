//! CA private keys at rest under a key-encryption key (KEK) that is not in the database.
//!
//! Each CA key is sealed with its own random 32-byte data key (DEK):
//! `envelope = 0x01 ‖ nonce(12) ‖ AES-256-GCM(DEK, key_pem, aad = "sluice/ca-key/v1/" + cluster + "/" + ca)`.
//! The DEK is stored once per KEK as a [`Wrap`]; a file KEK wraps it as
//! `nonce(12) ‖ AES-256-GCM(kek, DEK, aad = "sluice/dek/v1/" + cluster + "/" + ca + "/" + kek_id)`,
//! an AWS KMS KEK with `TrentService.Encrypt` under an encryption context naming the cluster and
//! the CA ([`kms`]). Rotating the KEK re-wraps the DEK ([`KeyRing::rewrap`]); the envelope is
//! never re-encrypted. The AAD binds a sealed key to its cluster and CA name, so rows copied
//! between CAs or clusters do not open.
//!
//! Everything here is synchronous: the state layer runs on blocking threads and in the
//! runtime-less admin CLI (a KMS call runs on its own short-lived thread and runtime).

pub mod kms;

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

pub use kms::{KmsConfig, KmsKek};

/// The first byte of an envelope: its format.
pub const ENVELOPE_V1: u8 = 0x01;
/// Length of a KEK, a DEK (AES-256).
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// A KEK file is a few dozen characters; anything much larger is not one.
const MAX_KEK_FILE: u64 = 1024;

#[derive(Debug, Error)]
pub enum KekError {
    /// No configured KEK has a wrap of this CA's DEK.
    #[error("the CA key is wrapped for [{}]; this node's KEKs are [{}]", .wrapped.join(", "), .ours.join(", "))]
    NoWrap { wrapped: Vec<String>, ours: Vec<String> },
    /// A bit changed somewhere, or the key was sealed for another cluster or CA name.
    #[error("CA key failed authentication: {0}")]
    Authentication(String),
    #[error("KEK file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid KEK configuration: {0}")]
    Config(String),
    #[error("AWS KMS: {0}")]
    Kms(String),
    #[error("the system random number generator failed")]
    Random,
}

/// The DEK of one CA, wrapped by one KEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrap {
    /// `file:` + 16 hex digits, or `kms:` + the key ARN.
    pub kek_id: String,
    pub wrapped_dek: Vec<u8>,
}

/// A CA key as stored: the envelope, and its DEK wrapped for one or more KEKs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    pub envelope: Vec<u8>,
    pub wraps: Vec<Wrap>,
}

/// Where KEKs come from, in the configuration: exactly one of `file` and `aws_kms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    /// A file of 32 bytes written as hex or base64, mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_kms: Option<KmsConfig>,
}

impl KekConfig {
    /// Checks the shape only (exactly one source; a KMS key given as a key ARN); the file itself
    /// is checked when it is loaded.
    pub fn validate(&self) -> Result<(), KekError> {
        match (&self.file, &self.aws_kms) {
            (Some(_), Some(_)) => Err(KekError::Config("set one of kek.file and kek.aws_kms, not both".into())),
            (None, None) => Err(KekError::Config("set kek.file or kek.aws_kms".into())),
            (Some(path), None) if path.as_os_str().is_empty() => Err(KekError::Config("kek.file is empty".into())),
            (Some(_), None) => Ok(()),
            (None, Some(kms)) => kms.validate().map(|_| ()),
        }
    }
}

/// One key-encryption key.
pub enum Kek {
    /// A 32-byte key read from a file on this node.
    File {
        id: String,
        key: Zeroizing<[u8; KEY_LEN]>,
    },
    Kms(KmsKek),
}

impl fmt::Debug for Kek {
    // Never the key bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Kek").field(&self.id()).finish()
    }
}

impl Kek {
    /// A file KEK from its bytes; its id is derived from them.
    pub fn from_key(key: [u8; KEY_LEN]) -> Kek {
        Kek::from_secret(Zeroizing::new(key))
    }

    /// As [`Kek::from_key`], without a copy of the key left behind.
    pub fn from_secret(key: Zeroizing<[u8; KEY_LEN]>) -> Kek {
        let mut h = Sha256::new();
        h.update(b"sluice-kek-id");
        h.update(key.as_slice());
        let digest = h.finalize();
        Kek::File { id: format!("file:{}", &hex::encode(digest)[..16]), key }
    }

    /// Loads the KEK a configuration names (reads the file; a KMS KEK makes no call yet).
    pub fn load(cfg: &KekConfig) -> Result<Kek, KekError> {
        cfg.validate()?;
        match (&cfg.file, &cfg.aws_kms) {
            (Some(path), _) => load_file(path),
            (_, Some(kms)) => Ok(Kek::Kms(KmsKek::new(kms)?)),
            (None, None) => Err(KekError::Config("set kek.file or kek.aws_kms".into())),
        }
    }

    /// `file:…` or `kms:ARN`: what a [`Wrap`] records.
    pub fn id(&self) -> &str {
        match self {
            Kek::File { id, .. } => id,
            Kek::Kms(k) => k.id(),
        }
    }

    fn wrap_dek(&self, cluster: &str, ca: &str, dek: &[u8; KEY_LEN]) -> Result<Wrap, KekError> {
        let wrapped_dek = match self {
            Kek::File { id, key } => seal_raw(key, &dek_aad(cluster, ca, id), dek)?,
            Kek::Kms(k) => k.encrypt(cluster, ca, dek)?,
        };
        Ok(Wrap { kek_id: self.id().to_owned(), wrapped_dek })
    }

    fn unwrap_dek(&self, cluster: &str, ca: &str, wrapped: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        let plain = match self {
            Kek::File { id, key } => open_raw(key, &dek_aad(cluster, ca, id), wrapped)
                .ok_or_else(|| KekError::Authentication(format!("the DEK wrapped for {id} does not open")))?,
            Kek::Kms(k) => k.decrypt(cluster, ca, wrapped)?,
        };
        let dek: [u8; KEY_LEN] = plain.as_slice().try_into().map_err(|_| {
            KekError::Authentication(format!(
                "the DEK unwrapped by {} is {} bytes, not {KEY_LEN}",
                self.id(),
                plain.len()
            ))
        })?;
        Ok(Zeroizing::new(dek))
    }
}

/// The KEKs of this node: the configured one first (it seals new keys), then the previous ones
/// (read-only, during a rotation).
#[derive(Debug)]
pub struct KeyRing {
    keks: Vec<Kek>,
}

impl KeyRing {
    pub fn new(primary: Kek, previous: Vec<Kek>) -> KeyRing {
        let mut keks = vec![primary];
        keks.extend(previous);
        KeyRing { keks }
    }

    /// Loads `kek` and `previous_keks` from the configuration.
    pub fn load(primary: &KekConfig, previous: &[KekConfig]) -> Result<KeyRing, KekError> {
        let first = Kek::load(primary)?;
        let rest = previous.iter().map(Kek::load).collect::<Result<Vec<_>, _>>()?;
        Ok(KeyRing::new(first, rest))
    }

    /// The KEK new keys are sealed with.
    pub fn primary(&self) -> &Kek {
        // `new` always puts one first.
        &self.keks[0]
    }

    pub fn keks(&self) -> &[Kek] {
        &self.keks
    }

    /// The ids of this node's KEKs, primary first.
    pub fn ids(&self) -> Vec<String> {
        self.keks.iter().map(|k| k.id().to_owned()).collect()
    }

    /// Seals `key_pem` (a CA's PKCS#8 PEM) under a fresh DEK wrapped by the primary KEK.
    pub fn seal(&self, cluster: &str, ca: &str, key_pem: &[u8]) -> Result<SealedKey, KekError> {
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new().fill(dek.as_mut_slice()).map_err(|_| KekError::Random)?;
        let mut envelope = vec![ENVELOPE_V1];
        envelope.extend(seal_raw(&dek, &envelope_aad(cluster, ca), key_pem)?);
        let wrap = self.primary().wrap_dek(cluster, ca, &dek)?;
        Ok(SealedKey { envelope, wraps: vec![wrap] })
    }

    /// The CA key in `sealed`, unwrapped with the first of this node's KEKs that has a wrap.
    pub fn open(&self, cluster: &str, ca: &str, sealed: &SealedKey) -> Result<Zeroizing<Vec<u8>>, KekError> {
        let dek = self.unwrap(cluster, ca, sealed)?;
        open_envelope(&dek, cluster, ca, &sealed.envelope)
    }

    /// The DEK of `sealed` wrapped for `to` (for `kek rotate`): unwrapped with one of this node's
    /// KEKs that has a wrap, checked against the envelope (so a rotation never stores a wrap of a
    /// DEK that does not open the key), then wrapped again. The envelope is left as it is.
    pub fn rewrap(&self, cluster: &str, ca: &str, sealed: &SealedKey, to: &Kek) -> Result<Wrap, KekError> {
        let dek = self.unwrap(cluster, ca, sealed)?;
        open_envelope(&dek, cluster, ca, &sealed.envelope)?;
        to.wrap_dek(cluster, ca, &dek)
    }

    fn unwrap(&self, cluster: &str, ca: &str, sealed: &SealedKey) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        for kek in &self.keks {
            if let Some(wrap) = sealed.wraps.iter().find(|w| w.kek_id == kek.id()) {
                return kek.unwrap_dek(cluster, ca, &wrap.wrapped_dek);
            }
        }
        Err(KekError::NoWrap { wrapped: sealed.wraps.iter().map(|w| w.kek_id.clone()).collect(), ours: self.ids() })
    }
}

fn envelope_aad(cluster: &str, ca: &str) -> Vec<u8> {
    format!("sluice/ca-key/v1/{cluster}/{ca}").into_bytes()
}

fn dek_aad(cluster: &str, ca: &str, kek_id: &str) -> Vec<u8> {
    format!("sluice/dek/v1/{cluster}/{ca}/{kek_id}").into_bytes()
}

fn open_envelope(
    dek: &[u8; KEY_LEN],
    cluster: &str,
    ca: &str,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KekError> {
    match envelope.first() {
        Some(&ENVELOPE_V1) => {}
        Some(v) => {
            let why = format!("the envelope's version byte is {v:#04x}, not {ENVELOPE_V1:#04x} (corrupt, or newer)");
            return Err(KekError::Authentication(why));
        }
        None => return Err(KekError::Authentication("the envelope is empty".into())),
    }
    open_raw(dek, &envelope_aad(cluster, ca), &envelope[1..]).ok_or_else(|| {
        KekError::Authentication(format!("the envelope does not open for cluster {cluster:?}, CA {ca:?}"))
    })
}

/// `nonce ‖ ciphertext ‖ tag` of `plain` under `key`, with a random nonce (each key seals few
/// messages: one DEK per CA key, one KEK per handful of DEKs).
fn seal_raw(key: &[u8; KEY_LEN], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KekError> {
    let key = aead_key(key);
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).map_err(|_| KekError::Random)?;
    let mut in_out = plain.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut in_out)
        .map_err(|_| KekError::Authentication("sealing failed".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + in_out.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&in_out);
    Ok(out)
}

/// The plaintext of `nonce ‖ ciphertext ‖ tag`, or `None` if it is short or does not authenticate.
fn open_raw(key: &[u8; KEY_LEN], aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut in_out = Zeroizing::new(body.to_vec());
    let n = aead_key(key).open_in_place(nonce, Aad::from(aad), &mut in_out).ok()?.len();
    in_out.truncate(n);
    Some(in_out)
}

fn aead_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    // AES_256_GCM takes exactly KEY_LEN bytes, which the type guarantees.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is a valid AES-256 key"))
}

/// Parses a KEK file's text: 32 bytes as 64 hex digits or as base64, surrounding whitespace
/// (a trailing newline) allowed. Errors never quote the text.
pub fn parse_key_text(text: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let trimmed = text.trim_ascii();
    let decoded =
        if trimmed.len() == 2 * KEY_LEN && trimmed.iter().all(u8::is_ascii_hexdigit) {
            Zeroizing::new(hex::decode(trimmed).map_err(|_| "not valid hex".to_owned())?)
        } else {
            let b64 = base64::engine::general_purpose::STANDARD;
            let nopad = base64::engine::general_purpose::STANDARD_NO_PAD;
            Zeroizing::new(b64.decode(trimmed).or_else(|_| nopad.decode(trimmed)).map_err(|_| {
                format!("not a key: expected {KEY_LEN} bytes as {} hex digits or as base64", 2 * KEY_LEN)
            })?)
        };
    let key: [u8; KEY_LEN] = decoded.as_slice().try_into().map_err(|_| {
        format!("holds {} bytes; a KEK is {KEY_LEN} bytes ({} hex digits or base64)", decoded.len(), 2 * KEY_LEN)
    })?;
    Ok(Zeroizing::new(key))
}

/// Reads a file KEK. A file that grants group or others any access is refused, not tightened:
/// the key may already have leaked, and the operator should know.
pub fn load_file(path: &Path) -> Result<Kek, KekError> {
    let err = |message: String| KekError::File { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    // The metadata of the open file, so a swap between check and read changes nothing.
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "is mode {mode:04o}: group and others must have no access to a KEK; run `chmod 600 {}` \
             (and consider the key exposed if others could read it)",
            path.display()
        )));
    }
    let mut text = Zeroizing::new(Vec::new());
    file.take(MAX_KEK_FILE + 1).read_to_end(&mut text).map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_KEK_FILE {
        return Err(err(format!("is larger than {MAX_KEK_FILE} bytes: not a KEK file")));
    }
    let key = parse_key_text(&text).map_err(err)?;
    Ok(Kek::from_secret(key))
}

/// Creates a new KEK file at `path` (0600 from its creation; refused if anything exists there)
/// holding 32 random bytes as hex. The directory is left as it is.
pub fn generate_file(path: &Path) -> Result<Kek, KekError> {
    let err = |message: String| KekError::File { path: path.to_path_buf(), message };
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new().fill(key.as_mut_slice()).map_err(|_| KekError::Random)?;
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            err("already exists; refusing to overwrite a KEK (it may be the only copy)".into())
        } else {
            err(e.to_string())
        }
    })?;
    let mut text = Zeroizing::new(hex::encode(key.as_slice()).into_bytes());
    text.push(b'\n');
    file.write_all(&text).and_then(|_| file.sync_all()).map_err(|e| err(e.to_string()))?;
    Ok(Kek::from_secret(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    const PEM: &[u8] =
        b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

    fn ring_of(keys: &[[u8; KEY_LEN]]) -> KeyRing {
        let mut keks = keys.iter().map(|k| Kek::from_key(*k));
        let first = keks.next().unwrap();
        KeyRing::new(first, keks.collect())
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("sluice-kek-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let ring = ring_of(&[[7; 32]]);
        let sealed = ring.seal("c1", "db", PEM).unwrap();
        assert_eq!(sealed.envelope[0], ENVELOPE_V1);
        assert_eq!(sealed.envelope.len(), 1 + NONCE_LEN + PEM.len() + TAG_LEN);
        assert_eq!(sealed.wraps.len(), 1);
        assert_eq!(sealed.wraps[0].kek_id, ring.primary().id());
        assert_eq!(sealed.wraps[0].wrapped_dek.len(), NONCE_LEN + KEY_LEN + TAG_LEN);
        assert!(!sealed.envelope.windows(10).any(|w| PEM.windows(10).any(|p| p == w)));
        assert_eq!(ring.open("c1", "db", &sealed).unwrap().as_slice(), PEM);
        // A second seal uses a new DEK and nonces.
        let again = ring.seal("c1", "db", PEM).unwrap();
        assert_ne!(again.envelope, sealed.envelope);
        assert_ne!(again.wraps[0].wrapped_dek, sealed.wraps[0].wrapped_dek);
    }

    #[test]
    fn file_kek_id_is_the_documented_hash() {
        let kek = Kek::from_key([0; 32]);
        let mut h = Sha256::new();
        h.update(b"sluice-kek-id");
        h.update([0u8; 32]);
        assert_eq!(kek.id(), format!("file:{}", &hex::encode(h.finalize())[..16]));
        assert_eq!(kek.id().len(), 5 + 16);
        assert_ne!(kek.id(), Kek::from_key([1; 32]).id());
        assert!(!format!("{kek:?}").contains("0, 0"), "{kek:?}");
    }

    #[test]
    fn wire_format_matches_the_design_independently_decrypted() {
        // Decrypt by hand from the documented layout, not through `open`.
        let key = [9u8; 32];
        let ring = ring_of(&[key]);
        let sealed = ring.seal("prod", "db", PEM).unwrap();
        let id = ring.primary().id().to_owned();
        let w = &sealed.wraps[0].wrapped_dek;
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
        let mut dek = w[12..].to_vec();
        let aad = format!("sluice/dek/v1/prod/db/{id}");
        let dek = k
            .open_in_place(Nonce::try_assume_unique_for_key(&w[..12]).unwrap(), Aad::from(aad.as_bytes()), &mut dek)
            .unwrap()
            .to_vec();
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).unwrap());
        let e = &sealed.envelope;
        let mut body = e[13..].to_vec();
        let plain = k
            .open_in_place(
                Nonce::try_assume_unique_for_key(&e[1..13]).unwrap(),
                Aad::from(b"sluice/ca-key/v1/prod/db".as_slice()),
                &mut body,
            )
            .unwrap();
        assert_eq!(plain, PEM);
    }

    #[test]
    fn wrong_kek_is_refused_listing_ids() {
        let a = ring_of(&[[1; 32]]);
        let b = ring_of(&[[2; 32]]);
        let sealed = a.seal("c", "db", PEM).unwrap();
        let e = b.open("c", "db", &sealed).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, KekError::NoWrap { .. }));
        assert_eq!(
            msg,
            format!("the CA key is wrapped for [{}]; this node's KEKs are [{}]", a.primary().id(), b.primary().id())
        );
        assert!(!msg.contains(&hex::encode([1u8; 32])) && !msg.contains(&hex::encode([2u8; 32])));
    }

    #[test]
    fn previous_keks_open_and_rewrap_rotates_without_reencrypting() {
        let old = ring_of(&[[1; 32]]);
        let sealed = old.seal("c", "db", PEM).unwrap();
        // A node configured with the new KEK and the old one as previous opens it.
        let rotating = ring_of(&[[2; 32], [1; 32]]);
        assert_eq!(rotating.open("c", "db", &sealed).unwrap().as_slice(), PEM);
        let new = Kek::from_key([2; 32]);
        let wrap = rotating.rewrap("c", "db", &sealed, &new).unwrap();
        assert_eq!(wrap.kek_id, new.id());
        // --keep-old: both wraps; a node still on the old KEK and one on the new both open it.
        let kept = SealedKey { envelope: sealed.envelope.clone(), wraps: vec![sealed.wraps[0].clone(), wrap.clone()] };
        assert_eq!(old.open("c", "db", &kept).unwrap().as_slice(), PEM);
        let only_new = ring_of(&[[2; 32]]);
        assert_eq!(only_new.open("c", "db", &kept).unwrap().as_slice(), PEM);
        // Retired: only the new wrap; the old KEK is refused with the ids.
        let retired = SealedKey { envelope: sealed.envelope.clone(), wraps: vec![wrap] };
        assert_eq!(only_new.open("c", "db", &retired).unwrap().as_slice(), PEM);
        let e = old.open("c", "db", &retired).unwrap_err().to_string();
        assert!(e.contains(new.id()) && e.contains(old.primary().id()), "{e}");
        // Rewrap needs a KEK that has a wrap.
        assert!(matches!(old.rewrap("c", "db", &retired, &new), Err(KekError::NoWrap { .. })));
    }

    #[test]
    fn rewrap_refuses_a_dek_that_does_not_open_the_envelope() {
        let ring = ring_of(&[[1; 32]]);
        let sealed = ring.seal("c", "db", PEM).unwrap();
        let other = ring.seal("c", "db", PEM).unwrap();
        let mixed = SealedKey { envelope: other.envelope, wraps: sealed.wraps };
        let e = ring.rewrap("c", "db", &mixed, &Kek::from_key([2; 32])).unwrap_err();
        assert!(e.to_string().starts_with("CA key failed authentication"), "{e}");
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let ring = ring_of(&[[3; 32]]);
        let sealed = ring.seal("c", "db", PEM).unwrap();
        for i in 0..sealed.envelope.len() * 8 {
            let mut s = sealed.clone();
            s.envelope[i / 8] ^= 1 << (i % 8);
            let e = ring.open("c", "db", &s).unwrap_err();
            assert!(e.to_string().starts_with("CA key failed authentication"), "bit {i}: {e}");
        }
        for i in 0..sealed.wraps[0].wrapped_dek.len() * 8 {
            let mut s = sealed.clone();
            s.wraps[0].wrapped_dek[i / 8] ^= 1 << (i % 8);
            let e = ring.open("c", "db", &s).unwrap_err();
            assert!(e.to_string().starts_with("CA key failed authentication"), "bit {i}: {e}");
        }
        // Truncations and extensions too.
        for n in 0..sealed.envelope.len() {
            let s = SealedKey { envelope: sealed.envelope[..n].to_vec(), wraps: sealed.wraps.clone() };
            assert!(matches!(ring.open("c", "db", &s), Err(KekError::Authentication(_))), "len {n}");
        }
        let mut s = sealed.clone();
        s.wraps[0].wrapped_dek.push(0);
        assert!(matches!(ring.open("c", "db", &s), Err(KekError::Authentication(_))));
    }

    #[test]
    fn aad_binds_cluster_and_ca_name() {
        let ring = ring_of(&[[4; 32]]);
        let sealed = ring.seal("c1", "db", PEM).unwrap();
        for (cluster, ca) in [("c1", "host"), ("c2", "db"), ("c1/db", ""), ("c1", "db/")] {
            let e = ring.open(cluster, ca, &sealed).unwrap_err();
            assert!(e.to_string().starts_with("CA key failed authentication"), "{cluster}/{ca}: {e}");
        }
        // The envelope alone is bound too: a valid DEK wrap for another CA name does not help.
        let host = ring.seal("c1", "host", PEM).unwrap();
        let dek = ring.unwrap("c1", "host", &host).unwrap();
        assert!(open_envelope(&dek, "c1", "host", &host.envelope).is_ok());
        let e = open_envelope(&ring.unwrap("c1", "db", &sealed).unwrap(), "c1", "host", &sealed.envelope);
        assert!(matches!(e, Err(KekError::Authentication(_))));
    }

    #[test]
    fn kek_text_in_hex_and_base64() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let hex = hex::encode(key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        for text in [
            hex.clone(),
            format!("{hex}\n"),
            hex.to_uppercase(),
            format!("{b64}\n"),
            b64.trim_end_matches('=').to_owned(),
            format!("  {b64}\r\n"),
        ] {
            assert_eq!(*parse_key_text(text.as_bytes()).unwrap(), key, "{text:?}");
        }
        for bad in
            [&hex[..62], "", "zz", &format!("{hex}00"), &base64::engine::general_purpose::STANDARD.encode([1u8; 31])]
        {
            let e = parse_key_text(bad.as_bytes()).unwrap_err();
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
    }

    #[test]
    fn kek_files_hex_base64_and_modes() {
        let dir = Dir::new("files");
        let key = [5u8; 32];
        let hex_path = dir.0.join("hex");
        std::fs::write(&hex_path, format!("{}\n", hex::encode(key))).unwrap();
        std::fs::set_permissions(&hex_path, Permissions::from_mode(0o600)).unwrap();
        let b64_path = dir.0.join("b64");
        std::fs::write(&b64_path, base64::engine::general_purpose::STANDARD.encode(key)).unwrap();
        std::fs::set_permissions(&b64_path, Permissions::from_mode(0o400)).unwrap();
        let want = Kek::from_key(key).id().to_owned();
        assert_eq!(load_file(&hex_path).unwrap().id(), want);
        assert_eq!(load_file(&b64_path).unwrap().id(), want);

        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&hex_path, Permissions::from_mode(mode)).unwrap();
            let e = load_file(&hex_path).unwrap_err().to_string();
            assert!(e.contains(&format!("mode {mode:04o}")) && e.contains("chmod 600"), "{e}");
            assert!(!e.contains(&hex::encode(key)), "{e}");
            // Refused, not tightened.
            assert_eq!(std::fs::metadata(&hex_path).unwrap().permissions().mode() & 0o777, mode);
        }

        let bad = dir.0.join("bad");
        std::fs::write(&bad, "secret-looking-but-not-a-key\n").unwrap();
        std::fs::set_permissions(&bad, Permissions::from_mode(0o600)).unwrap();
        let e = load_file(&bad).unwrap_err().to_string();
        assert!(!e.contains("secret-looking"), "{e}");
        assert!(load_file(&dir.0.join("missing")).is_err());
        assert!(load_file(&dir.0).unwrap_err().to_string().contains("not a regular file"));
    }

    #[test]
    fn generate_creates_0600_and_refuses_to_overwrite() {
        let dir = Dir::new("gen");
        std::fs::set_permissions(&dir.0, Permissions::from_mode(0o755)).unwrap();
        let path = dir.0.join("kek");
        let kek = generate_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir.0).unwrap().permissions().mode() & 0o777, 0o755);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(load_file(&path).unwrap().id(), kek.id());
        let e = generate_file(&path).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // Two generated keys differ.
        assert_ne!(generate_file(&dir.0.join("kek2")).unwrap().id(), kek.id());
    }

    #[test]
    fn config_shape() {
        let parse = |s: &str| serde_json::from_str::<KekConfig>(s);
        let file = parse(r#"{"file": "/etc/sluice/kek"}"#).unwrap();
        file.validate().unwrap();
        assert_eq!(serde_json::to_string(&file).unwrap(), r#"{"file":"/etc/sluice/kek"}"#);
        let kms = parse(r#"{"aws_kms": {"key_id": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab", "region": "us-east-1"}}"#).unwrap();
        kms.validate().unwrap();
        assert!(parse(r#"{"file": "/k", "aws_kms": {"key_id": "arn:aws:kms:us-east-1:1:key/x"}}"#)
            .unwrap()
            .validate()
            .is_err());
        assert!(parse("{}").unwrap().validate().is_err());
        assert!(parse(r#"{"file": ""}"#).unwrap().validate().is_err());
        assert!(parse(r#"{"flie": "/k"}"#).is_err());
        let e = KeyRing::load(&KekConfig::default(), &[]).unwrap_err();
        assert!(matches!(e, KekError::Config(_)));
    }

    #[test]
    fn keyring_load_reads_files_in_order() {
        let dir = Dir::new("ring");
        let a = dir.0.join("a");
        let b = dir.0.join("b");
        let ka = generate_file(&a).unwrap();
        let kb = generate_file(&b).unwrap();
        let cfg = |p: &Path| KekConfig { file: Some(p.to_path_buf()), aws_kms: None };
        let ring = KeyRing::load(&cfg(&b), &[cfg(&a)]).unwrap();
        assert_eq!(ring.ids(), vec![kb.id().to_owned(), ka.id().to_owned()]);
        std::fs::set_permissions(&a, Permissions::from_mode(0o644)).unwrap();
        assert!(KeyRing::load(&cfg(&b), &[cfg(&a)]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            envelope in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            wrapped in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
            first in proptest::num::u8::ANY,
        ) {
            let ring = ring_of(&[[6; 32]]);
            let id = ring.primary().id().to_owned();
            let mut envelope = envelope;
            if let Some(b) = envelope.first_mut() {
                // Half the cases reach the AEAD with the right version byte.
                if first % 2 == 0 { *b = ENVELOPE_V1; }
            }
            let sealed = SealedKey { envelope, wraps: vec![Wrap { kek_id: id, wrapped_dek: wrapped }] };
            proptest::prop_assert!(ring.open("c", "db", &sealed).is_err());
            proptest::prop_assert!(ring.rewrap("c", "db", &sealed, &Kek::from_key([7; 32])).is_err());
            // With a valid wrap, arbitrary envelopes still fail cleanly.
            let good = ring.seal("c", "db", b"k").unwrap();
            let mixed = SealedKey { envelope: sealed.envelope.clone(), wraps: good.wraps };
            proptest::prop_assert!(matches!(ring.open("c", "db", &mixed), Err(KekError::Authentication(_))));
        }
    }
}
