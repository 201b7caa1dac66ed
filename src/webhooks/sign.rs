//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): the headers
//! `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 of
//! HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the key is the secret's bytes, written
//! `whsec_<base64>`. A receiver using any Standard Webhooks library verifies these unchanged.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// An endpoint's signing key. Never printed: `Debug` says only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The spec's bounds on a key: 24 to 64 bytes.
const MIN_KEY: usize = 24;
const MAX_KEY: usize = 64;

impl Secret {
    /// Reads `whsec_<base64>` (the prefix may be left out). The error says what is wrong and
    /// never repeats the value.
    pub fn parse(s: &str) -> Result<Secret, String> {
        let b64 = s.trim().strip_prefix("whsec_").unwrap_or(s.trim());
        let key = B64
            .decode(b64)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
            .map_err(|_| "must be whsec_ followed by base64".to_string())?;
        if !(MIN_KEY..=MAX_KEY).contains(&key.len()) {
            return Err(format!(
                "must hold {MIN_KEY} to {MAX_KEY} bytes (it holds {})",
                key.len()
            ));
        }
        Ok(Secret(key))
    }

    /// A new random 32-byte key.
    pub fn generate() -> Secret {
        let mut key = vec![0u8; 32];
        rand::fill(&mut key[..]);
        Secret(key)
    }

    /// The `whsec_...` form, to hand to the endpoint's owner once.
    pub fn expose(&self) -> String {
        format!("whsec_{}", B64.encode(&self.0))
    }

    /// The `webhook-signature` header's value for this message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
        msg.extend_from_slice(id.as_bytes());
        msg.push(b'.');
        msg.extend_from_slice(timestamp.to_string().as_bytes());
        msg.push(b'.');
        msg.extend_from_slice(body);
        format!("v1,{}", B64.encode(hmac_sha256(&self.0, &msg)))
    }
}

use crate::domain::unsubscribe::hmac_sha256;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::unsubscribe::hmac_sha256;

    /// RFC 4231, test cases 1 and 6 (a key longer than a block).
    #[test]
    fn hmac_matches_rfc_4231() {
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// The example of the Standard Webhooks reference libraries' own tests.
    #[test]
    fn signs_like_the_reference_implementation() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let e = Secret::parse("whsec_not*base64").unwrap_err();
        assert!(!e.contains("not*base64"), "{e}");
        assert!(
            Secret::parse("whsec_c2hvcnQ=")
                .unwrap_err()
                .contains("24 to 64")
        );
        let g = Secret::generate();
        assert_eq!(Secret::parse(&g.expose()).unwrap(), g);
        assert_eq!(format!("{g:?}"), "Secret(***)");
    }
}
