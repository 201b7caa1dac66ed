//! One-click unsubscribe links (RFC 8058): a per-email, per-recipient token signed with the
//! installation's key, so a POST to `{api.public_url}/u/{token}` proves which recipient of
//! which email asked. Pure: the key is given.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};

use super::EmailId;

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn mac(key: &[u8], id: &str, recipient: &str) -> String {
    let m = hmac_sha256(key, format!("unsubscribe\n{id}\n{recipient}").as_bytes());
    B64.encode(&m[..16])
}

/// The token for `recipient` (lowercased) of email `id`.
pub fn token(key: &[u8], id: &str, recipient: &str) -> String {
    let r = recipient.to_lowercase();
    format!("{id}.{}.{}", B64.encode(r.as_bytes()), mac(key, id, &r))
}

/// The email and recipient a token names, if its signature holds.
pub fn verify(key: &[u8], token: &str) -> Option<(EmailId, String)> {
    if token.len() > 1024 {
        return None;
    }
    let mut it = token.split('.');
    let (id, r, m) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let id = EmailId::parse(id).ok()?;
    let r = String::from_utf8(B64.decode(r).ok()?).ok()?;
    let want = mac(key, id.as_str(), &r);
    // Constant time: the MAC is the secret part.
    use subtle::ConstantTimeEq;
    bool::from(want.as_bytes().ct_eq(m.as_bytes())).then_some((id, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_tampered_ones_do_not() {
        let key = b"0123456789abcdef0123456789abcdef";
        let id = EmailId::generate();
        let t = token(key, id.as_str(), "Ann@Example.com");
        assert_eq!(
            verify(key, &t),
            Some((id.clone(), "ann@example.com".into()))
        );
        assert_eq!(verify(b"another key, another installation", &t), None);
        let other = token(key, id.as_str(), "bob@example.com");
        let forged = format!(
            "{}.{}.{}",
            id,
            t.split('.').nth(1).unwrap(),
            other.split('.').nth(2).unwrap()
        );
        assert_eq!(
            verify(key, &forged),
            None,
            "a MAC is bound to its recipient"
        );
        for bad in ["", "x", "a.b.c", &format!("{t}.x"), &"a".repeat(2000)] {
            assert_eq!(verify(key, bad), None, "{bad}");
        }
    }
}
