//! Raw message bytes -> [`Message`] (what rules test) with mail-parser. Never fails: malformed
//! MIME, odd charsets and truncated messages give whatever parts could be read.

use mail_parser::{HeaderValue, MessageParser};
use sha2::{Digest, Sha256};

use super::rules::{Addr, Message};

/// At most this much of the body is matched (regexes run in linear time, but a 1 MiB body per
/// message still adds up in a backlog).
const MAX_BODY_CHARS: usize = 256 * 1024;
/// Characters of body shown in an alert.
const SNIPPET_CHARS: usize = 240;

/// A parsed message plus what the watcher stores about it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub message: Message,
    /// SHA-256 of the raw header block: the same message copied or re-numbered by the server
    /// keeps it, so a UIDVALIDITY resync recognises messages it has already alerted on.
    pub fingerprint: String,
    /// False when mail-parser found no message structure at all (the raw text was used).
    pub well_formed: bool,
}

/// Parses `raw` (possibly cut at `max_message_bytes`).
pub fn parse(raw: &[u8]) -> Parsed {
    let fingerprint = hex::encode(Sha256::digest(header_block(raw)));
    let Some(p) = MessageParser::default().parse(raw) else {
        return Parsed {
            message: Message {
                body: truncate(&String::from_utf8_lossy(raw), MAX_BODY_CHARS),
                ..Default::default()
            },
            fingerprint,
            well_formed: false,
        };
    };
    let addrs = |a: Option<&mail_parser::Address>| -> Vec<Addr> {
        a.map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some(Addr {
                        name: x.name.as_ref().map(|n| n.to_string()),
                        address: x.address.as_ref()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
    };
    let mut to = addrs(p.to());
    to.extend(addrs(p.cc()));
    let raw_of = |h: &mail_parser::Header| -> String {
        raw.get(h.offset_start as usize..h.offset_end as usize)
            .map(|b| String::from_utf8_lossy(b).trim().to_string())
            .unwrap_or_default()
    };
    let headers = p
        .headers()
        .iter()
        .map(|h| {
            let value = match &h.value {
                HeaderValue::Text(t) => t.to_string(),
                HeaderValue::TextList(l) => l.join(", "),
                _ => raw_of(h),
            };
            (h.name.as_str().to_ascii_lowercase(), value)
        })
        .collect();
    let mut body = (0..p.text_body_count())
        .filter_map(|i| p.body_text(i))
        .collect::<Vec<_>>()
        .join("\n");
    if body.trim().is_empty() {
        // No text part could be decoded (an unknown charset, a broken structure): match on the
        // raw bytes after the header block instead of nothing.
        let head = header_block(raw).len();
        body = String::from_utf8_lossy(&raw[head.min(raw.len())..]).into_owned();
    }
    Parsed {
        message: Message {
            from: addrs(p.from()),
            to,
            subject: p.subject().unwrap_or_default().to_string(),
            date: p.date().map(|d| d.to_rfc3339()),
            body: truncate(&body, MAX_BODY_CHARS),
            headers,
            has_attachment: p.attachment_count() > 0,
        },
        fingerprint,
        well_formed: true,
    }
}

/// The first `SNIPPET_CHARS` characters of the body, whitespace folded.
pub fn snippet(m: &Message) -> String {
    let folded = m.body.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s = truncate(&folded, SNIPPET_CHARS);
    if s.len() < folded.len() {
        s.push('…');
    }
    s
}

/// `s` made safe to store and show: control characters (NUL among them, which PostgreSQL cannot
/// store in text) become spaces, and the result is cut to at most `max_bytes` at a character
/// boundary, ending in `…` when cut. Everything a hostile message contributes to a hit passes
/// through here.
pub fn clip(s: &str, max_bytes: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max_bytes {
        return clean;
    }
    let mut end = max_bytes.saturating_sub('…'.len_utf8());
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

/// One part of a group key: cleaned, whitespace folded, at most [`KEY_PART_BYTES`]. A longer
/// value keeps its start plus a short hash of the whole, so two long values that differ only
/// at the end still make two groups, and every key fits the database's index rows.
pub fn key_part(s: &str) -> String {
    let folded = s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if folded.len() <= KEY_PART_BYTES {
        return folded;
    }
    let hash = hex::encode(&Sha256::digest(folded.as_bytes())[..4]);
    format!("{}#{hash}", clip(&folded, KEY_PART_BYTES - 9))
}

/// Bytes of one group-key part (see [`key_part`]).
pub const KEY_PART_BYTES: usize = 200;

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// Bytes up to the first empty line (or all of them).
fn header_block(raw: &[u8]) -> &[u8] {
    for (i, w) in raw.windows(4).enumerate() {
        if w == b"\r\n\r\n" {
            return &raw[..i];
        }
    }
    match raw.windows(2).position(|w| w == b"\n\n") {
        Some(i) => &raw[..i],
        None => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_headers_body_and_attachments() {
        let raw = b"From: \"Disk Monitor\" <mon@example.com>\r\nTo: ops@example.com\r\nCc: Dba <dba@example.com>\r\nSubject: =?utf-8?q?Disk_=C3=BCber_90=25?=\r\nX-Host: db1\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nDisk =FCber 90%\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=x.bin\r\n\r\nAAAA\r\n--b--\r\n";
        let p = parse(raw);
        assert!(p.well_formed);
        let m = &p.message;
        assert_eq!(m.from[0].address, "mon@example.com");
        assert_eq!(m.from[0].display(), "Disk Monitor <mon@example.com>");
        assert_eq!(m.to.len(), 2);
        assert_eq!(m.subject, "Disk über 90%");
        assert!(m.body.contains("Disk über 90%"), "{:?}", m.body);
        assert!(m.has_attachment);
        assert!(m.headers.contains(&("x-host".into(), "db1".into())));
        assert_eq!(m.date.as_deref(), Some("2026-11-22T10:00:00Z"));
    }

    #[test]
    fn malformed_input_still_gives_something_to_match() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00garbage without headers",
            b"Subject: cut off mid-header",
            b"Content-Type: multipart/mixed; boundary=x\r\nSubject: broken\r\n\r\n--x\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\nbody text\r\n",
        ] {
            let p = parse(raw);
            assert_eq!(p.fingerprint.len(), 64);
            let _ = snippet(&p.message);
        }
        let p = parse(b"Content-Type: multipart/mixed; boundary=x\r\nSubject: broken\r\n\r\n--x\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\nbody text\r\n");
        assert_eq!(p.message.subject, "broken");
        assert!(p.message.body.contains("body text"));
    }

    #[test]
    fn clipped_text_is_clean_and_bounded_in_bytes() {
        assert_eq!(clip("a\u{0}b\u{1b}[31mc", 100), "a b [31mc");
        let long = "ü".repeat(300);
        let c = clip(&long, 101);
        assert!(c.len() <= 101 && c.ends_with('…'), "{}", c.len());
        // Key parts: folded, and a long one keeps a hash of the whole.
        assert_eq!(key_part("  db1 \t\u{0} x  "), "db1 x");
        let a = key_part(&format!("{}A", "x".repeat(5000)));
        let b = key_part(&format!("{}B", "x".repeat(5000)));
        assert!(a.len() <= KEY_PART_BYTES && b.len() <= KEY_PART_BYTES);
        assert_ne!(a, b, "long values differing at the end stay apart");
        assert_eq!(a, key_part(&format!("{}A", "x".repeat(5000))));
    }

    #[test]
    fn fingerprint_is_the_header_block_and_snippets_are_short() {
        let a = parse(b"Subject: a\r\nMessage-ID: <1@x>\r\n\r\nbody one");
        let b = parse(b"Subject: a\r\nMessage-ID: <1@x>\r\n\r\nbody two");
        let c = parse(b"Subject: a\r\nMessage-ID: <2@x>\r\n\r\nbody one");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
        let long = parse(format!("Subject: x\r\n\r\n{}", "word  ".repeat(500)).as_bytes());
        let s = snippet(&long.message);
        assert!(s.chars().count() <= SNIPPET_CHARS + 1 && s.ends_with('…'));
        assert!(!s.contains("  "));
    }
}
