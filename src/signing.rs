//! Ed25519 key pairs that live in memory only, and the check of what they
//! signed: the one primitive behind the ledger's signatures (a leader signs
//! each line, validators countersign) and the miners' signed statements of
//! the all-reduce slices they hand out.
//!
//! Every signature covers a domain tag besides its message, so that a
//! signature made for one purpose never passes for another's. ring's
//! Ed25519 (the crate already carries the links' AES-GCM) does the work;
//! keys and signatures travel as lowercase hex.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// A key pair made in memory: once its process ends, nobody can sign with
/// it again.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public_hex())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot make a signing key: the system's random source failed")]
pub struct NoRandomness;

impl SigningKey {
    pub fn generate() -> Result<SigningKey, NoRandomness> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| NoRandomness)?;
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map(SigningKey)
            .map_err(|_| NoRandomness)
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.0.public_key())
    }

    /// The signature (hex) of `message` under `domain`.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> String {
        hex::encode(self.0.sign(&[domain, message].concat()))
    }
}

/// Whether `signature` (hex) is `key`'s (hex) of `message` under `domain`;
/// false for anything that does not parse.
pub fn verify(key: &str, signature: &str, domain: &[u8], message: &[u8]) -> bool {
    match (hex::decode(key).ok(), hex::decode(signature).ok()) {
        (Some(key), Some(sig)) => UnparsedPublicKey::new(&ED25519, key)
            .verify(&[domain, message].concat(), &sig)
            .is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_message_and_domain_only_and_under_its_own_key_only() {
        let (a, b) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let s = a.sign(b"one", b"message");
        assert!(verify(&a.public_hex(), &s, b"one", b"message"));
        assert!(!verify(&a.public_hex(), &s, b"one", b"massage"));
        assert!(!verify(&a.public_hex(), &s, b"two", b"message"));
        assert!(!verify(&b.public_hex(), &s, b"one", b"message"));
        assert!(!verify(&a.public_hex(), "zz", b"one", b"message"));
        assert!(!verify("abc", &s, b"one", b"message"));
    }
}
