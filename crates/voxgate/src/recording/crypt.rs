//! Per-user encryption at rest of recorded audio (as Omi's enhanced data protection): AES-256-GCM,
//! each object `nonce (12 bytes) || ciphertext || tag (16 bytes)` with a fresh random nonce and
//! no associated data. Through aws-lc-rs, the TLS stack's provider already in the build, so no
//! second cryptography library is compiled in.

use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Why a key or an object is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptError {
    #[error("a recording key must be 64 hex digits (AES-256)")]
    BadKey,
    #[error("cannot decrypt a recording object: wrong key or corrupted object")]
    Decrypt,
}

/// One user's key.
#[derive(Clone)]
pub struct Key(Arc<LessSafeKey>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, CryptError> {
        let bytes = hex::decode(hex.trim()).map_err(|_| CryptError::BadKey)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| CryptError::BadKey)?;
        Ok(Self(Arc::new(LessSafeKey::new(key))))
    }

    /// `plain` encrypted under a fresh nonce.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system random generator works");
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(NONCE_LEN);
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .expect("AES-GCM seals any object under 64 GiB");
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of a sealed object.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
        if sealed.len() < NONCE_LEN {
            return Err(CryptError::Decrypt);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptError::Decrypt)?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::empty(), &mut body)
            .map_err(|_| CryptError::Decrypt)?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_open_with_their_key_only() {
        let key = Key::from_hex(&"11".repeat(32)).unwrap();
        let sealed = key.seal(b"sixteen kHz pcm!");
        assert_eq!(sealed.len(), 12 + 16 + 16);
        assert!(!sealed.windows(16).any(|w| w == b"sixteen kHz pcm!"));
        assert_eq!(key.open(&sealed).unwrap(), b"sixteen kHz pcm!");
        assert_ne!(key.seal(b"x"), key.seal(b"x"), "fresh nonces");
        let other = Key::from_hex(&"22".repeat(32)).unwrap();
        assert_eq!(other.open(&sealed), Err(CryptError::Decrypt));
        assert_eq!(key.open(&sealed[..20]), Err(CryptError::Decrypt));
        assert_eq!(Key::from_hex("abcd").unwrap_err(), CryptError::BadKey);
    }
}
