//! Bounces and complaints, read from a bounce mailbox (`purpose = "bounces"`). Pure: raw
//! message bytes in, a [`Report`] (or nothing: not a bounce) out. Never fails.
//!
//! - DSNs (RFC 3464, `multipart/report; report-type=delivery-status`): each per-recipient
//!   block's `Final-Recipient` (or `Original-Recipient`), `Action`, `Status`,
//!   `Diagnostic-Code`. `failed` with 5.x.x is a hard bounce, with 4.x.x soft; `delayed`,
//!   `relayed`, `delivered` and `expanded` are not bounces.
//! - ARF complaints (RFC 5965, `report-type=feedback-report`): the complainer is
//!   `Original-Rcpt-To`, else the returned message's `To`.
//! - What MTAs send without a report part (qmail's and Exim's texts, old Exchange NDRs):
//!   best effort, by the address and the status code or diagnostic next to it.
//!
//! The email a report answers: the `+<id>` of a VERP return path the report was sent to
//! (`delivery.return_path`), else the returned message's `X-Postbox-Id`, else its
//! `Message-ID` (looked up by the store).

use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::message::clip;

/// What a report says about one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hard,
    Soft,
    Complaint,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hard => "hard",
            Kind::Soft => "soft",
            Kind::Complaint => "complaint",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Dsn,
    Arf,
    Heuristic,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Dsn => "dsn",
            Format::Arf => "arf",
            Format::Heuristic => "heuristic",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounced {
    /// The addr-spec, lowercased.
    pub address: String,
    pub kind: Kind,
    /// The enhanced status code (`5.1.1`), when given.
    pub status: Option<String>,
    pub diagnostic: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub format: Format,
    pub recipients: Vec<Bounced>,
    /// The email id, from a VERP return path or an `X-Postbox-Id` header.
    pub email_id: Option<String>,
    /// The returned message's Message-ID (without angle brackets).
    pub message_id: Option<String>,
}

/// Bounded outside text: at most this many bytes of a diagnostic are kept (`message::clip`:
/// control characters become spaces).
const DIAGNOSTIC_BYTES: usize = 500;
/// At most this many recipients are read from one report.
const MAX_RECIPIENTS: usize = 100;

/// Reads a bounce or complaint; None when `raw` is neither (or says nothing usable).
pub fn parse(raw: &[u8]) -> Option<Report> {
    let msg = MessageParser::default().parse(raw)?;
    let mut email_id = verp_id(raw);
    let mut message_id = None;
    let mut status_fields: Option<String> = None;
    let mut feedback_fields: Option<String> = None;
    let mut original_to: Vec<String> = Vec::new();
    for part in msg.parts.iter() {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let sub = ct.subtype().unwrap_or("").to_ascii_lowercase();
        let ctype = ct.ctype().to_ascii_lowercase();
        match (ctype.as_str(), sub.as_str()) {
            ("message", "delivery-status") | ("message", "global-delivery-status") => {
                status_fields = Some(String::from_utf8_lossy(part.contents()).into_owned());
            }
            ("message", "feedback-report") => {
                feedback_fields = Some(String::from_utf8_lossy(part.contents()).into_owned());
            }
            ("message", "rfc822") | ("message", "global") | ("text", "rfc822-headers") => {
                let headers = match &part.body {
                    PartType::Message(m) => {
                        String::from_utf8_lossy(header_block(m.raw_message())).into_owned()
                    }
                    _ => String::from_utf8_lossy(header_block(part.contents())).into_owned(),
                };
                let fields = fields(&headers);
                if email_id.is_none() {
                    email_id = field(&fields, "x-postbox-id")
                        .map(|v| v.trim().to_string())
                        .filter(|v| is_id(v));
                }
                if message_id.is_none() {
                    message_id = field(&fields, "message-id").map(|v| {
                        v.trim()
                            .trim_start_matches('<')
                            .trim_end_matches('>')
                            .to_string()
                    });
                }
                if let Some(to) = field(&fields, "to") {
                    original_to.extend(addresses_in(to));
                }
            }
            _ => {}
        }
    }
    let (format, recipients) = if let Some(f) = feedback_fields {
        let blocks = blocks(&f);
        let first = blocks.first().cloned().unwrap_or_default();
        let mut who: Vec<String> = first
            .iter()
            .filter(|(k, _)| k == "original-rcpt-to")
            .flat_map(|(_, v)| addresses_in(v))
            .collect();
        if who.is_empty() {
            who = original_to;
        }
        let kind = field(&first, "feedback-type").unwrap_or("abuse").trim();
        (
            Format::Arf,
            who.into_iter()
                .map(|address| Bounced {
                    address,
                    kind: Kind::Complaint,
                    status: None,
                    diagnostic: Some(clip(&format!("feedback-type: {kind}"), DIAGNOSTIC_BYTES)),
                })
                .collect(),
        )
    } else if let Some(s) = status_fields {
        (Format::Dsn, dsn_recipients(&s))
    } else {
        (Format::Heuristic, heuristic(&msg, raw))
    };
    let mut recipients = recipients;
    recipients.truncate(MAX_RECIPIENTS);
    // A returned copy that is not a MIME part (qmail, Exim) still carries our header.
    if email_id.is_none() {
        let text = String::from_utf8_lossy(&raw[..raw.len().min(256 * 1024)]).into_owned();
        email_id = text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().eq_ignore_ascii_case("x-postbox-id") && is_id(v.trim()))
                .then(|| v.trim().to_string())
        });
    }
    if recipients.is_empty() {
        return None;
    }
    Some(Report {
        format,
        recipients,
        email_id,
        message_id: message_id.map(|m| clip(&m, DIAGNOSTIC_BYTES)),
    })
}

/// The per-recipient blocks of a `message/delivery-status` body.
fn dsn_recipients(body: &str) -> Vec<Bounced> {
    let mut out = Vec::new();
    // The first block is per-message; the rest are per-recipient (some MTAs omit the first
    // block's blank line: any block with a recipient field counts).
    for b in blocks(body) {
        let Some(rcpt) = field(&b, "final-recipient").or_else(|| field(&b, "original-recipient"))
        else {
            continue;
        };
        let Some(address) = addresses_in(rcpt.rsplit(';').next().unwrap_or(rcpt))
            .into_iter()
            .next()
            .or_else(|| bare_address(rcpt.rsplit(';').next().unwrap_or(rcpt)))
        else {
            continue;
        };
        let action = field(&b, "action")
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if action != "failed" {
            // delayed, relayed, delivered, expanded: not a bounce.
            continue;
        }
        let status = field(&b, "status").and_then(enhanced_code);
        let diagnostic = field(&b, "diagnostic-code").map(|d| {
            clip(
                d.split_once(';').map_or(d, |(_, text)| text).trim(),
                DIAGNOSTIC_BYTES,
            )
        });
        let kind = match status.as_deref().and_then(|s| s.chars().next()) {
            Some('4') => Kind::Soft,
            Some('5') => Kind::Hard,
            _ => diagnostic
                .as_deref()
                .map(classify_text)
                .unwrap_or(Kind::Hard),
        };
        out.push(Bounced {
            address,
            kind,
            status,
            diagnostic,
        });
    }
    out
}

/// A report without a report part: the human-readable text is searched for addresses with
/// a status next to them (qmail's `<a@b>:` paragraphs, Exim's indented address lines, the
/// `550 5.1.1 <a@b>` of many MTAs). Only messages that look like bounces are read.
fn heuristic(msg: &mail_parser::Message, raw: &[u8]) -> Vec<Bounced> {
    let subject = msg.subject().unwrap_or("").to_ascii_lowercase();
    let from = msg
        .from()
        .and_then(|f| f.first())
        .and_then(|a| a.address.as_deref())
        .unwrap_or("")
        .to_ascii_lowercase();
    let looks = [
        "undeliver",
        "delivery status notification",
        "delivery failure",
        "mail delivery failed",
        "failure notice",
        "returned mail",
        "delivery has failed",
        "could not be delivered",
    ]
    .iter()
    .any(|w| subject.contains(w))
        || from.starts_with("mailer-daemon@")
        || from.starts_with("postmaster@");
    if !looks {
        return Vec::new();
    }
    let text = msg
        .body_text(0)
        .map(|t| t.into_owned())
        .unwrap_or_else(|| String::from_utf8_lossy(raw).into_owned());
    // Only the report itself, not the returned copy of the message.
    let text: String = text
        .split("--- Below this line is a copy of the message")
        .next()
        .unwrap_or("")
        .split("------ This is a copy of the message")
        .next()
        .unwrap_or("")
        .chars()
        .take(64 * 1024)
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<Bounced> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        for address in addresses_in(line).into_iter().chain(bare_address(line)) {
            if out.iter().any(|b| b.address == address) || address.starts_with("mailer-daemon@") {
                continue;
            }
            // The status is on this line or in the few that follow.
            let near: String = lines[i..lines.len().min(i + 4)].join(" ");
            let status = near.split_whitespace().find_map(enhanced_code);
            let code = near
                .split(|c: char| !c.is_ascii_digit())
                .find(|w| w.len() == 3 && (w.starts_with('4') || w.starts_with('5')));
            let diagnostic = Some(clip(near.trim(), DIAGNOSTIC_BYTES));
            let kind = match status
                .as_deref()
                .and_then(|s| s.chars().next())
                .or_else(|| code.and_then(|c| c.chars().next()))
            {
                Some('4') => Kind::Soft,
                Some('5') => Kind::Hard,
                _ => {
                    let k = classify_text(&near);
                    if k == Kind::Hard && !mentions_failure(&near) {
                        continue;
                    }
                    k
                }
            };
            out.push(Bounced {
                address,
                kind,
                status,
                diagnostic,
            });
        }
    }
    out
}

fn mentions_failure(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    [
        "unknown",
        "does not exist",
        "no such",
        "not found",
        "rejected",
        "invalid",
        "disabled",
        "unavailable",
        "failed",
        "undeliverable",
    ]
    .iter()
    .any(|w| s.contains(w))
}

/// Hard or soft from a diagnostic without a code.
fn classify_text(s: &str) -> Kind {
    let s = s.to_ascii_lowercase();
    if [
        "mailbox full",
        "over quota",
        "quota exceeded",
        "try again",
        "temporar",
        "greylist",
    ]
    .iter()
    .any(|w| s.contains(w))
    {
        Kind::Soft
    } else {
        Kind::Hard
    }
}

/// `5.1.1` (RFC 3463) in `s`, if it is one.
fn enhanced_code(s: &str) -> Option<String> {
    let s = s.trim().trim_end_matches([',', ';', ')', '.']);
    let s = s.trim_start_matches(['(', '#']);
    let mut it = s.split('.');
    let (a, b, c) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some()
        || !matches!(a, "2" | "4" | "5")
        || b.is_empty()
        || b.len() > 3
        || c.is_empty()
        || c.len() > 3
        || !b.bytes().chain(c.bytes()).all(|x| x.is_ascii_digit())
    {
        return None;
    }
    Some(format!("{a}.{b}.{c}"))
}

/// The header block of a message (up to the first blank line).
fn header_block(raw: &[u8]) -> &[u8] {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(raw.len());
    &raw[..end]
}

/// Header-like fields, unfolded, names lowercased.
fn fields(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

/// The blocks (separated by blank lines) of a `message/delivery-status` or
/// `message/feedback-report` body, each as fields.
fn blocks(text: &str) -> Vec<Vec<(String, String)>> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .map(fields)
        .filter(|b| !b.is_empty())
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Every `<addr>` in `s`, lowercased.
fn addresses_in(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        let after = &rest[i + 1..];
        let Some(j) = after.find('>') else { break };
        if let Some(a) = bare_address(&after[..j]) {
            out.push(a);
        }
        rest = &after[j + 1..];
    }
    out
}

/// `s` (trimmed, maybe quoted) when it is a plain `local@domain`, lowercased.
fn bare_address(s: &str) -> Option<String> {
    let s = s
        .trim()
        .trim_matches(|c| matches!(c, '<' | '>' | '"' | '\'' | ':' | ',' | ';' | '(' | ')'));
    let (local, domain) = s.rsplit_once('@')?;
    let ok = |p: &str, extra: &[char]| {
        !p.is_empty()
            && p.len() <= 254
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c) || !c.is_ascii())
    };
    (ok(
        local,
        &[
            '.', '_', '-', '+', '=', '!', '#', '$', '%', '&', '*', '/', '?', '^', '`', '{', '|',
            '}', '~', '\'',
        ],
    ) && ok(domain, &['.', '-'])
        && domain.contains('.'))
    .then(|| s.to_lowercase())
}

/// An email id (a ULID: 26 characters of Crockford base32).
fn is_id(s: &str) -> bool {
    s.len() == 26 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The `<id>` of a VERP return path (`bounces+<id>@...`) the report was addressed to:
/// `Delivered-To`, `X-Original-To`, `Envelope-To`, `Return-Path` (of the report: some
/// servers) or `To`.
fn verp_id(raw: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(header_block(raw)).into_owned();
    for (k, v) in fields(&head) {
        if !matches!(
            k.as_str(),
            "delivered-to" | "x-original-to" | "envelope-to" | "to"
        ) {
            continue;
        }
        for a in addresses_in(&v).into_iter().chain(bare_address(&v)) {
            let local = a.split('@').next().unwrap_or("");
            if let Some((_, tag)) = local.rsplit_once('+') {
                let id = tag.to_ascii_uppercase();
                if is_id(&id) {
                    return Some(id);
                }
            }
        }
    }
    None
}

impl Report {
    /// The store's form of this report.
    pub fn into_record(self) -> crate::store::BounceRecord {
        use crate::store::BounceKind;
        crate::store::BounceRecord {
            format: self.format.as_str(),
            email_id: self.email_id,
            message_id: self.message_id,
            recipients: self
                .recipients
                .into_iter()
                .map(|b| {
                    let kind = match b.kind {
                        Kind::Hard => BounceKind::Hard,
                        Kind::Soft => BounceKind::Soft,
                        Kind::Complaint => BounceKind::Complaint,
                    };
                    (b.address, kind, b.status, b.diagnostic)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_are_read_and_other_numbers_are_not() {
        assert_eq!(enhanced_code("5.1.1"), Some("5.1.1".into()));
        assert_eq!(enhanced_code("(#5.1.1)"), Some("5.1.1".into()));
        assert_eq!(enhanced_code("4.2.2,"), Some("4.2.2".into()));
        for no in ["1.2.3", "5.1", "5.1.1.1", "127.0.0.1", "a.b.c", "5..1"] {
            assert_eq!(enhanced_code(no), None, "{no}");
        }
    }

    #[test]
    fn addresses_are_found_bare_or_bracketed() {
        assert_eq!(
            addresses_in("To: Ann <Ann@Example.com>"),
            vec!["ann@example.com"]
        );
        assert_eq!(bare_address("rfc822; bob@example.org"), None);
        assert_eq!(
            bare_address(" bob@example.org"),
            Some("bob@example.org".into())
        );
        assert_eq!(bare_address("not an address"), None);
    }

    const ID: &str = "01KZZZZZZZZZZZZZZZZZZZZZZZ";

    fn fixture(name: &str, id: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/support/bounces/{name}.eml",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path)
            .unwrap()
            .replace("{ID}", id)
            .replace("{RCPT}", "Gone@Example.org")
            .replace("{MSGID}", "<01KZZZZZZZZZZZZZZZZZZZZZZZ@example.test>")
            .replace('\n', "\r\n")
            .into_bytes()
    }

    /// Each MTA's format, as those systems write them: who, how, and which email.
    #[test]
    fn real_formats_are_read() {
        for (name, format, kind, status, by_id) in [
            ("postfix", Format::Dsn, Kind::Hard, Some("5.1.1"), true),
            ("exim", Format::Heuristic, Kind::Hard, Some("5.1.1"), true),
            ("exchange", Format::Dsn, Kind::Hard, Some("5.1.10"), true),
            ("gmail", Format::Dsn, Kind::Hard, Some("5.1.1"), false),
            ("qmail", Format::Heuristic, Kind::Hard, Some("5.1.1"), true),
            ("arf", Format::Arf, Kind::Complaint, None, true),
        ] {
            let r = parse(&fixture(name, ID)).unwrap_or_else(|| panic!("{name}: no report"));
            assert_eq!(r.format, format, "{name}");
            assert_eq!(r.recipients.len(), 1, "{name}: {r:#?}");
            let b = &r.recipients[0];
            assert_eq!(b.address, "gone@example.org", "{name}");
            assert_eq!(b.kind, kind, "{name}");
            assert_eq!(b.status.as_deref(), status, "{name}: {b:?}");
            if by_id {
                assert_eq!(r.email_id.as_deref(), Some(ID), "{name}");
            }
        }
        assert_eq!(
            parse(&fixture("gmail", ID)).unwrap().message_id.as_deref(),
            Some("01KZZZZZZZZZZZZZZZZZZZZZZZ@example.test")
        );
    }

    #[test]
    fn a_delayed_dsn_is_not_a_bounce() {
        assert_eq!(parse(&fixture("delayed", ID)), None);
    }

    #[test]
    fn garbage_is_not_a_report() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"\x00\xff\xfe garbage"), None);
        assert_eq!(
            parse(b"Subject: hello\r\n\r\nJust a note to bob@example.com\r\n"),
            None
        );
    }
}
