//! The rules engine: a pure function from a parsed message to the rules it matches, with the
//! named captures and the group each match falls into. No IO; regexes are compiled once, by
//! [`super::config::compile`].

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;

use super::config::Then;
use crate::domain::{EmailAddress, Priority};

/// An address as found in a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addr {
    pub name: Option<String>,
    pub address: String,
}

impl Addr {
    /// `Name <address>` or just the address.
    pub fn display(&self) -> String {
        match &self.name {
            Some(n) if !n.is_empty() => format!("{n} <{}>", self.address),
            _ => self.address.clone(),
        }
    }
}

/// What the rules look at: a message reduced to the parts they can test.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub from: Vec<Addr>,
    /// To and Cc.
    pub to: Vec<Addr>,
    pub subject: String,
    /// The Date header as written, if any.
    pub date: Option<String>,
    /// The text body (text/plain parts, or the HTML part reduced to text).
    pub body: String,
    /// Every header, name lower-cased, value decoded to text.
    pub headers: Vec<(String, String)>,
    pub has_attachment: bool,
}

impl Message {
    pub fn sender(&self) -> String {
        self.from
            .first()
            .map(|a| a.address.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

/// A field a regex is tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    From,
    To,
    Subject,
    Body,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::From => "from",
            Field::To => "to",
            Field::Subject => "subject",
            Field::Body => "body",
        }
    }
}

/// A compiled condition tree.
#[derive(Debug, Clone)]
pub enum Cond {
    /// Addresses (from, to) are tried one by one, as `address` and as `Name <address>`.
    Field(Field, Regex),
    /// A header (lower-cased name): any of its values matches.
    Header(String, Regex),
    HasAttachment(bool),
    /// Every test holds (an empty list always holds).
    All(Vec<Cond>),
    /// At least one holds (an empty list never does); the first branch that holds gives its
    /// captures.
    Any(Vec<Cond>),
    /// Holds when the inner one does not; its captures are dropped.
    Not(Box<Cond>),
}

impl Cond {
    /// Tests `m`; on success the named captures of the regexes that matched are in `caps`.
    pub fn eval(&self, m: &Message, caps: &mut BTreeMap<String, String>) -> bool {
        match self {
            Cond::Field(f, re) => match f {
                Field::Subject => capture(re, &m.subject, caps),
                Field::Body => capture(re, &m.body, caps),
                Field::From => addrs(re, &m.from, caps),
                Field::To => addrs(re, &m.to, caps),
            },
            Cond::Header(name, re) => m
                .headers
                .iter()
                .filter(|(n, _)| n == name)
                .any(|(_, v)| capture(re, v, caps)),
            Cond::HasAttachment(want) => m.has_attachment == *want,
            Cond::All(tests) => tests.iter().all(|t| t.eval(m, caps)),
            Cond::Any(tests) => tests.iter().any(|t| {
                let mut mine = BTreeMap::new();
                let ok = t.eval(m, &mut mine);
                if ok {
                    caps.extend(mine);
                }
                ok
            }),
            Cond::Not(inner) => !inner.eval(m, &mut BTreeMap::new()),
        }
    }

    /// Every named capture group in the tree (outside `not`).
    pub fn capture_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_names(&mut out);
        out
    }

    fn collect_names(&self, out: &mut Vec<String>) {
        match self {
            Cond::Field(_, re) | Cond::Header(_, re) => {
                out.extend(re.capture_names().flatten().map(str::to_string))
            }
            Cond::HasAttachment(_) | Cond::Not(_) => {}
            Cond::All(t) | Cond::Any(t) => t.iter().for_each(|c| c.collect_names(out)),
        }
    }
}

fn capture(re: &Regex, text: &str, caps: &mut BTreeMap<String, String>) -> bool {
    let Some(c) = re.captures(text) else {
        return false;
    };
    for name in re.capture_names().flatten() {
        if let Some(v) = c.name(name) {
            caps.insert(name.to_string(), v.as_str().to_string());
        }
    }
    true
}

fn addrs(re: &Regex, list: &[Addr], caps: &mut BTreeMap<String, String>) -> bool {
    list.iter()
        .any(|a| capture(re, &a.address, caps) || capture(re, &a.display(), caps))
}

/// One part of a group key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Mailbox,
    Sender,
    Subject,
    Capture(String),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub cond: Cond,
    pub recipients: Vec<EmailAddress>,
    pub severity: String,
    pub priority: Priority,
    pub template: String,
    /// Alerts are always per rule; these split a rule's matches further.
    pub group_by: Vec<GroupBy>,
    pub group_wait: Duration,
    pub repeat_interval: Duration,
    pub then: Then,
    pub move_to: Option<String>,
}

/// A rule that matched a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Index into the rules.
    pub rule: usize,
    pub captures: BTreeMap<String, String>,
    /// `sender=a@example.com, host=db1`; empty when the rule groups only by itself.
    pub group_key: String,
}

/// Every rule `m` matches, in rule order.
pub fn evaluate(rules: &[Rule], mailbox: &str, m: &Message) -> Vec<Match> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let mut caps = BTreeMap::new();
        if r.cond.eval(m, &mut caps) {
            let group_key = group_key(&r.group_by, mailbox, m, &caps);
            out.push(Match {
                rule: i,
                captures: caps,
                group_key,
            });
        }
    }
    out
}

fn group_key(
    by: &[GroupBy],
    mailbox: &str,
    m: &Message,
    caps: &BTreeMap<String, String>,
) -> String {
    use super::message::key_part;
    // Every part is cleaned and bounded (a subject or capture comes from whoever sent the mail):
    // the key is stored in indexed columns, and shown in alerts.
    by.iter()
        .map(|g| match g {
            GroupBy::Mailbox => format!("mailbox={mailbox}"),
            GroupBy::Sender => format!("sender={}", key_part(&m.sender())),
            GroupBy::Subject => format!("subject={}", key_part(&m.subject)),
            GroupBy::Capture(c) => {
                format!("{c}={}", key_part(caps.get(c).map_or("", |s| s.as_str())))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to do with a message on the server after its matches are stored: the first matching
/// rule that moves wins; else any rule that marks seen; else nothing.
pub fn disposition<'a>(rules: &'a [Rule], matches: &[Match]) -> Option<Disposition<'a>> {
    let ms = || matches.iter().map(|m| &rules[m.rule]);
    if let Some(r) = ms().find(|r| r.then == Then::Move) {
        return r.move_to.as_deref().map(Disposition::Move);
    }
    ms().any(|r| r.then == Then::Seen)
        .then_some(Disposition::Seen)
}

/// See [`disposition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition<'a> {
    Seen,
    Move(&'a str),
}

#[cfg(test)]
mod tests {
    use super::super::config::{MailboxSettings, compile};
    use super::*;

    fn rules(toml_rules: &str) -> Vec<Rule> {
        let text = format!(
            "name = \"mon\"\nhost = \"127.0.0.1\"\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"ops@example.com\"]\n{toml_rules}"
        );
        let m: MailboxSettings = toml::from_str(&text).unwrap();
        let mut c = compile(&[m], &|_| None).unwrap();
        std::sync::Arc::get_mut(&mut c[0]).unwrap().rules.clone()
    }

    fn msg() -> Message {
        Message {
            from: vec![Addr {
                name: Some("Nagios".into()),
                address: "nagios@mon.example.com".into(),
            }],
            to: vec![Addr {
                name: None,
                address: "alerts@example.com".into(),
            }],
            subject: "PROBLEM: db1 disk /var is 97% full".into(),
            date: Some("Sun, 22 Nov 2026 10:00:00 +0000".into()),
            body: "Host db1\nState CRITICAL\n".into(),
            headers: vec![
                ("x-nagios-host".into(), "db1".into()),
                ("x-priority".into(), "1".into()),
            ],
            has_attachment: false,
        }
    }

    #[test]
    fn conditions_table() {
        let m = msg();
        // (rule block, matches?)
        let cases: &[(&str, bool)] = &[
            (r#"subject = "disk""#, true),
            (r#"subject = "^disk""#, false),
            (r#"from = "@mon\\.example\\.com$""#, true),
            (r#"from = "^Nagios <""#, true),
            (r#"from = "zabbix""#, false),
            (r#"to = "^alerts@""#, true),
            (r#"body = "(?m)^State CRITICAL$""#, true),
            (r#"body = "WARNING""#, false),
            (
                r#"headers = [{ name = "X-Nagios-Host", regex = "^db\\d$" }]"#,
                true,
            ),
            (r#"headers = [{ name = "X-Missing", regex = "" }]"#, false),
            ("has_attachment = false", true),
            ("has_attachment = true", false),
            // all (default): every test must hold
            ("subject = \"disk\"\nbody = \"WARNING\"", false),
            // any: one is enough
            (
                "match = \"any\"\nsubject = \"disk\"\nbody = \"WARNING\"",
                true,
            ),
            (
                "match = \"any\"\nsubject = \"nope\"\nbody = \"WARNING\"",
                false,
            ),
            // nested any / all / not
            (
                r#"any = [{ subject = "nope" }, { body = "CRITICAL" }]"#,
                true,
            ),
            (r#"any = [{ subject = "nope" }, { body = "OK" }]"#, false),
            (
                r#"all = [{ subject = "disk" }, { body = "CRITICAL" }]"#,
                true,
            ),
            (r#"not = { subject = "(?i)test" }"#, true),
            (r#"not = { subject = "db1" }"#, false),
            (
                "subject = \"disk\"\nnot = { any = [{ from = \"zabbix\" }, { body = \"OK\" }] }",
                true,
            ),
            // an empty block matches everything
            ("", true),
        ];
        for (block, want) in cases {
            let r = rules(&format!("[[rules]]\nname = \"r\"\n{block}\n"));
            let got = !evaluate(&r, "mon", &m).is_empty();
            assert_eq!(got, *want, "rule block: {block}");
        }
    }

    #[test]
    fn captures_become_variables_and_group_keys() {
        let r = rules(
            r#"
[[rules]]
name = "disk"
subject = 'PROBLEM: (?P<host>\S+) disk (?P<disk>\S+) is (?P<pct>\d+)% full'
group_by = ["rule", "host", "sender"]
[[rules]]
name = "other"
any = [{ subject = "(?P<nope>zzz)" }, { body = "Host (?P<h>\\w+)" }]
not = { subject = "(?P<hidden>disk)x" }
"#,
        );
        let got = evaluate(&r, "mon", &msg());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].rule, 0);
        assert_eq!(got[0].captures["host"], "db1");
        assert_eq!(got[0].captures["disk"], "/var");
        assert_eq!(got[0].captures["pct"], "97");
        assert_eq!(got[0].group_key, "host=db1, sender=nagios@mon.example.com");
        // only the branch that matched gives captures; `not` gives none
        assert_eq!(got[1].captures.keys().collect::<Vec<_>>(), vec!["h"]);
        assert_eq!(got[1].group_key, "");
    }

    #[test]
    fn disposition_prefers_move_then_seen() {
        let r = rules(
            r#"
[[rules]]
name = "a"
then = "seen"
[[rules]]
name = "b"
then = "move"
move_to = "Alerts"
[[rules]]
name = "c"
"#,
        );
        let m = |idx: &[usize]| -> Vec<Match> {
            idx.iter()
                .map(|&i| Match {
                    rule: i,
                    captures: Default::default(),
                    group_key: String::new(),
                })
                .collect()
        };
        assert_eq!(
            disposition(&r, &m(&[0, 1])),
            Some(Disposition::Move("Alerts"))
        );
        assert_eq!(disposition(&r, &m(&[0, 2])), Some(Disposition::Seen));
        assert_eq!(disposition(&r, &m(&[2])), None);
    }

    #[test]
    fn config_errors_name_mailbox_rule_and_field() {
        let base = "name = \"mon\"\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"ops@example.com\"]\n";
        let cases = [
            (
                "[[rules]]\nname = \"r1\"\nsubject = \"(unclosed\"",
                "mailboxes[0].rules[0].subject",
            ),
            (
                "[[rules]]\nname = \"r1\"\nnot = { body = \"[z-a]\" }",
                "mailboxes[0].rules[0].not.body",
            ),
            (
                "[[rules]]\nname = \"r1\"\nany = [{ subject = \"ok\" }, { headers = [{ name = \"X\", regex = \"(\" }] }]",
                "mailboxes[0].rules[0].any[1].headers[0].regex",
            ),
            (
                "[[rules]]\nname = \"r1\"\nseverity = \"loud\"",
                "mailboxes[0].rules[0].severity",
            ),
            (
                "[[rules]]\nname = \"r1\"\ngroup_by = [\"host\"]",
                "mailboxes[0].rules[0].group_by",
            ),
            (
                "[[rules]]\nname = \"r1\"\ntemplate = \"welcome\"",
                "mailboxes[0].rules[0].template",
            ),
            (
                "[[rules]]\nname = \"r1\"\nthen = \"move\"",
                "mailboxes[0].rules[0].move_to",
            ),
            (
                "[[rules]]\nname = \"r1\"\nalert_to = [\"nope\"]",
                "mailboxes[0].rules[0].alert_to",
            ),
            (
                "[[rules]]\nname = \"mailbox-down\"",
                "mailboxes[0].rules[0].name",
            ),
            (
                "[[rules]]\nname = \"r1\"\n[[rules]]\nname = \"r1\"",
                "mailboxes[0].rules[1].name",
            ),
        ];
        for (rules, key) in cases {
            let m: MailboxSettings = toml::from_str(&format!("{base}{rules}")).unwrap();
            let e = compile(&[m], &|_| None).unwrap_err();
            assert_eq!(e.key, key, "{rules}");
            assert!(e.message.contains("mailbox \"mon\", rule \""), "{e}");
        }
        let m: MailboxSettings =
            toml::from_str("name = \"mon\"\nhost = \"h\"\nusername = \"u\"\npassword_env = \"POSTBOX_TEST_NOPE\"\nalert_to = [\"ops@example.com\"]").unwrap();
        let e = compile(&[m], &|_| None).unwrap_err();
        assert_eq!(e.key, "mailboxes[0].password_env");
        assert!(e.message.contains("POSTBOX_TEST_NOPE"));
        // Plaintext IMAP only to this machine, unless explicitly allowed.
        let plain = |host: &str, allow: bool| {
            let t = format!(
                "name = \"mon\"\nhost = \"{host}\"\ntls = \"none\"\nallow_plaintext = {allow}\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"ops@example.com\"]"
            );
            compile(&[toml::from_str(&t).unwrap()], &|_| None).map(|_| ())
        };
        assert_eq!(
            plain("imap.example.com", false).unwrap_err().key,
            "mailboxes[0].tls"
        );
        assert!(plain("imap.example.com", true).is_ok());
        assert!(plain("127.0.0.1", false).is_ok());
    }
}
