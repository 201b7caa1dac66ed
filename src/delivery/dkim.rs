//! DKIM signing (RFC 6376; Ed25519 per RFC 8463), per From domain, with lettre's signer.
//!
//! Keys come from a file or an environment variable and are never printed: errors name the
//! key (`dkim[0].key_file`) and the problem, never the key's text.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use lettre::Message;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;

use super::settings::{DkimAlgorithm, DkimSettings};
use crate::settings::ConfigError;

/// The headers signed (those present; a listed header that is absent is signed as empty, so
/// that it cannot be added later). Not Content-Type: lettre writes a multipart message's
/// Content-Type with the body, after the headers it signs, so it cannot be covered.
const SIGNED: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "MIME-Version",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, thiserror::Error)]
#[error("DKIM: {0}")]
pub struct DkimError(String);

/// The signing keys, by From domain (lowercase).
#[derive(Clone, Default)]
pub struct DkimSigner {
    by_domain: HashMap<String, Arc<DkimConfig>>,
}

impl std::fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSigner")
            .field("domains", &self.by_domain.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DkimSigner {
    /// Reads and checks every `[[dkim]]` key; `env` looks up `key_env`.
    pub fn load(
        list: &[DkimSettings],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DkimSigner, ConfigError> {
        let mut by_domain = HashMap::new();
        for (i, d) in list.iter().enumerate() {
            let key = |k: &str| format!("dkim[{i}].{k}");
            let domain = d.domain.trim().to_ascii_lowercase();
            if domain.is_empty() || domain.contains('@') || domain.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    key("domain"),
                    "must be a domain (example.com)",
                ));
            }
            let selector_ok = !d.selector.is_empty()
                && d.selector.len() <= 63
                && d.selector
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !selector_ok {
                return Err(ConfigError::new(
                    key("selector"),
                    "must be 1-63 characters of A-Z a-z 0-9 - . _ (a DNS label)",
                ));
            }
            let (text, from) = match (&d.key_file, &d.key_env) {
                (Some(path), None) => (
                    std::fs::read_to_string(path).map_err(|e| {
                        ConfigError::new(
                            key("key_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?,
                    "key_file",
                ),
                (None, Some(var)) => (
                    env(var).ok_or_else(|| {
                        ConfigError::new(
                            key("key_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?,
                    "key_env",
                ),
                _ => {
                    return Err(ConfigError::new(
                        key("key_file"),
                        "give exactly one of key_file or key_env",
                    ));
                }
            };
            let signing =
                signing_key(&text, d.algorithm).map_err(|m| ConfigError::new(key(from), m))?;
            if by_domain.contains_key(&domain) {
                return Err(ConfigError::new(
                    key("domain"),
                    format!("{domain} has two [[dkim]] entries"),
                ));
            }
            let config = DkimConfig::new(
                d.selector.clone(),
                domain.clone(),
                signing,
                SIGNED
                    .iter()
                    .map(|h| HeaderName::new_from_ascii_str(h))
                    .collect(),
                DkimCanonicalization {
                    header: DkimCanonicalizationType::Relaxed,
                    body: DkimCanonicalizationType::Relaxed,
                },
            );
            by_domain.insert(domain, Arc::new(config));
        }
        Ok(DkimSigner { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// Signs `message` if its From domain has a key (adds a `DKIM-Signature` header).
    pub fn sign(&self, message: &mut Message, from_domain: &str) {
        if let Some(c) = self.by_domain.get(&from_domain.to_ascii_lowercase()) {
            message.sign(c);
        }
    }
}

/// The key lettre wants: RSA as PKCS#1 PEM (PKCS#8 is converted), at least 2048 bits;
/// Ed25519 as the base64 seed (PKCS#8 PEM is unwrapped). The error never quotes the key.
fn signing_key(text: &str, algorithm: DkimAlgorithm) -> Result<DkimSigningKey, String> {
    let text = text.trim();
    match algorithm {
        DkimAlgorithm::Rsa => {
            use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
            use rsa::pkcs8::DecodePrivateKey;
            use rsa::traits::PublicKeyParts;
            let key = rsa::RsaPrivateKey::from_pkcs1_pem(text)
                .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(text))
                .map_err(|_| {
                    "is not an RSA private key in PEM (PKCS#1 `BEGIN RSA PRIVATE KEY` or \
                     PKCS#8 `BEGIN PRIVATE KEY`)"
                        .to_string()
                })?;
            let bits = key.size() * 8;
            if bits < 2048 {
                return Err(format!(
                    "the RSA key has {bits} bits; DKIM keys must have at least 2048"
                ));
            }
            let pem = key
                .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
                .map_err(|e| format!("cannot re-encode the RSA key: {e}"))?;
            DkimSigningKey::new(&pem, DkimSigningAlgorithm::Rsa)
                .map_err(|e| format!("the RSA key is refused: {e}"))
        }
        DkimAlgorithm::Ed25519 => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let seed: Vec<u8> = if text.starts_with("-----BEGIN PRIVATE KEY-----") {
                let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
                let der = b64
                    .decode(body.trim())
                    .map_err(|_| "is not valid PEM".to_string())?;
                // PKCS#8 for Ed25519 (RFC 8410): a fixed 16-byte prefix, then the 32-byte seed.
                const PREFIX: [u8; 16] = [
                    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04,
                    0x22, 0x04, 0x20,
                ];
                if der.len() != 48 || der[..16] != PREFIX {
                    return Err("is not an Ed25519 private key (PKCS#8)".into());
                }
                der[16..].to_vec()
            } else {
                b64.decode(text).map_err(|_| {
                    "is not an Ed25519 private key (PKCS#8 PEM or the base64 32-byte seed)"
                        .to_string()
                })?
            };
            if seed.len() != 32 {
                return Err("an Ed25519 key is 32 bytes".into());
            }
            DkimSigningKey::new(&b64.encode(&seed), DkimSigningAlgorithm::Ed25519)
                .map_err(|e| format!("the Ed25519 key is refused: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(alg: DkimAlgorithm, var: &str) -> Vec<DkimSettings> {
        vec![DkimSettings {
            domain: "example.com".into(),
            selector: "s1".into(),
            algorithm: alg,
            key_file: None,
            key_env: Some(var.into()),
        }]
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key_without_quoting_it() {
        let secret = "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END RSA PRIVATE KEY-----";
        let e = DkimSigner::load(&settings(DkimAlgorithm::Rsa, "K"), &|_| {
            Some(secret.to_string())
        })
        .unwrap_err();
        assert_eq!(e.key, "dkim[0].key_env");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        let e = DkimSigner::load(&settings(DkimAlgorithm::Ed25519, "K"), &|_| {
            Some("AAAA".to_string())
        })
        .unwrap_err();
        assert_eq!(e.key, "dkim[0].key_env");
        let mut s = settings(DkimAlgorithm::Ed25519, "K");
        s[0].selector = "bad selector".into();
        let seed = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let e = DkimSigner::load(&s, &|_| Some(seed.clone())).unwrap_err();
        assert_eq!(e.key, "dkim[0].selector");
        s[0].selector = "s1".into();
        assert!(DkimSigner::load(&s, &|_| Some(seed.clone())).is_ok());
    }
}
