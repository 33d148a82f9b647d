//! What Postfix's log lines mean for our mails: the bounces processor's logic, per queue id.
//!
//! Lines of one message (one queue id) arrive in log order on one partition (`postfix-log` is
//! keyed by queue id). The tracker keeps, per queue id still in Postfix's queue:
//!
//! - our mail id, learnt from the cleanup daemon's `message-id=<MAILID@OUR-DOMAIN>` line (we
//!   set the Message-ID to our mail id when sending). A message whose Message-ID is not ours
//!   (a bounce notice, anything another program sent) has no mail id and its lines are ignored;
//! - whether the envelope sender is empty (`from=<>`: a bounce notice, ignored whatever its
//!   Message-ID);
//! - the recipients currently deferred.
//!
//! Per recipient status line: `sent` → mail status *sent*; `deferred` → mail status and
//! delivery issue *deferred*; `bounced` → mail status *bounced*, delivery issue *bounced* and,
//! only when the DSN says the address itself is bad ([`flags_address`]: 5.1.1, 5.1.2, 5.1.3,
//! 5.1.6, 5.1.10, 5.2.1, 5.4.4 with the recipient's own domain not found), the address flagged
//! unreachable. Other permanent refusals (5.7.x spam/policy/relay, 5.3.4 and 5.2.3 size, 5.4.6
//! loop, 5.6.x content, …) say nothing about the address: a blocklisted sending IP or a
//! relay misconfiguration must not flag every recipient for good. `status=expired` turns every
//! recipient still deferred into mail status *failed* and a delivery issue *expired* (a soft
//! bounce: not flagged). `removed` forgets the queue id, so state is bounded by Postfix's queue.
//!
//! The tracker is pure (time is the caller's); its state is a map the processor keeps in a
//! state store keyed by queue id.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::events::{AddressStatus, DeliveryIssue, IssueKind, MailState, MailStatus};
use crate::ids::mail_id_from_message_id;
use crate::postfix::parse::{LogLine, RcptStatus};

/// One queued message's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Our mail id, if the Message-ID is ours.
    pub mail_id: Option<String>,
    /// `from=<>`: a bounce notice.
    pub notice: bool,
    /// Recipients deferred and not yet final.
    pub deferred: BTreeSet<String>,
}

/// What the tracker emits for one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// To `mail-status`.
    Status(MailStatus),
    /// To `delivery-issues`.
    Issue(DeliveryIssue),
    /// To `address-status`.
    Flag(AddressStatus),
}

/// Counters of lines seen (for metrics and the bring-up's progress).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Status lines for our mails.
    pub matched: u64,
    /// Status lines for messages that are not ours (no mail id).
    pub unmatched: u64,
    /// Lines of bounce notices.
    pub notices: u64,
}

/// The bounces logic over a map of queue id → [`Message`] (a state store in the processor).
#[derive(Debug, Clone)]
pub struct Tracker {
    domain: String,
    /// Counters.
    pub counts: Counts,
}

impl Tracker {
    /// A tracker for mails whose Message-IDs end in `@domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        Tracker {
            domain: domain.into(),
            counts: Counts::default(),
        }
    }

    /// Applies one line to `msg` (the state of the line's queue id; `None` when unknown).
    /// Returns the new state (`None`: forget the queue id) and the events.
    pub fn apply(
        &mut self,
        msg: Option<Message>,
        line: &LogLine,
        at_ms: i64,
    ) -> (Option<Message>, Vec<Output>) {
        let mut m = msg.unwrap_or_default();
        let mut out = Vec::new();
        match line {
            LogLine::MessageId { message_id, .. } => {
                m.mail_id = mail_id_from_message_id(message_id, &self.domain).map(str::to_owned);
            }
            LogLine::QueueActive { from, .. } => m.notice |= from.is_empty(),
            LogLine::Removed { .. } => return (None, out),
            LogLine::NonDeliveryNotice { .. } | LogLine::Other => {}
            LogLine::Status {
                qid,
                to,
                orig_to,
                dsn,
                status,
                detail,
                ..
            } => {
                let mail_id = match (&m.mail_id, m.notice) {
                    (_, true) => {
                        self.counts.notices += 1;
                        None
                    }
                    (None, false) => {
                        self.counts.unmatched += 1;
                        None
                    }
                    (Some(id), false) => {
                        self.counts.matched += 1;
                        Some(id.clone())
                    }
                };
                if let Some(mail_id) = mail_id {
                    // The address we sent to: RCPT TO as given, when Postfix rewrote it.
                    let rcpt = orig_to.as_deref().unwrap_or(to).to_ascii_lowercase();
                    let (state, issue) = match status {
                        RcptStatus::Sent => {
                            m.deferred.remove(&rcpt);
                            (MailState::Sent, None)
                        }
                        RcptStatus::Deferred => {
                            m.deferred.insert(rcpt.clone());
                            (MailState::Deferred, Some(IssueKind::Deferred))
                        }
                        RcptStatus::Bounced => {
                            m.deferred.remove(&rcpt);
                            (MailState::Bounced, Some(IssueKind::Bounced))
                        }
                    };
                    out.push(Output::Status(MailStatus {
                        mail_id: mail_id.clone(),
                        queue_id: Some(qid.clone()),
                        to: rcpt.clone(),
                        status: state,
                        dsn: Some(dsn.clone()),
                        detail: detail.clone(),
                        at_ms,
                    }));
                    if let Some(kind) = issue {
                        out.push(Output::Issue(DeliveryIssue {
                            mail_id: mail_id.clone(),
                            queue_id: qid.clone(),
                            to: rcpt.clone(),
                            kind,
                            dsn: dsn.clone(),
                            detail: detail.clone(),
                            at_ms,
                        }));
                    }
                    if *status == RcptStatus::Bounced && flags_address(dsn, detail, &rcpt) {
                        out.push(Output::Flag(AddressStatus {
                            address: rcpt,
                            unreachable: true,
                            reason: format!("{dsn} {detail}"),
                            mail_id: Some(mail_id),
                            at_ms,
                        }));
                    }
                }
            }
            LogLine::Expired { qid } => {
                if let (Some(mail_id), false) = (&m.mail_id, m.notice) {
                    for rcpt in std::mem::take(&mut m.deferred) {
                        out.push(Output::Status(MailStatus {
                            mail_id: mail_id.clone(),
                            queue_id: Some(qid.clone()),
                            to: rcpt.clone(),
                            status: MailState::Failed,
                            dsn: None,
                            detail: "expired in the queue after deferrals".into(),
                            at_ms,
                        }));
                        out.push(Output::Issue(DeliveryIssue {
                            mail_id: mail_id.clone(),
                            queue_id: qid.clone(),
                            to: rcpt,
                            kind: IssueKind::Expired,
                            dsn: String::new(),
                            detail: "returned to sender".into(),
                            at_ms,
                        }));
                    }
                }
            }
        }
        (Some(m), out)
    }
}

/// Whether a `status=bounced` line with this DSN and detail means the recipient address
/// itself is bad, so it is flagged unreachable (nothing clears a flag): RFC 3463's 5.1.1 bad
/// mailbox, 5.1.2 bad domain, 5.1.3 bad syntax, 5.1.6 moved, 5.1.10 null MX (the set the
/// notifications processor flags at RCPT time); 5.2.1 (mailbox disabled); and 5.4.4 (unable
/// to route) only when the detail says the host or domain was not found (Postfix's "Host or
/// domain name not found") **for the recipient's own domain** (`name=<its domain>`): a relay
/// host or transport next hop whose name does not resolve (a mistyped `relayhost`) bounces
/// every mail with the same text naming the relay, which says nothing about any address; nor
/// does a transient-looking routing failure. Everything else
/// (5.1.7/5.1.8, about our sender address; 5.1.0/5.1.4/5.1.5, nothing certain; 5.7.x policy,
/// spam blocks and relay denials; 5.2.2 and 5.3.4/5.2.3 size; 5.4.6 loops; 5.5.x protocol;
/// 5.6.x content; a DSN that does not parse) is a bounce without a flag.
pub fn flags_address(dsn: &str, detail: &str, rcpt: &str) -> bool {
    let mut parts = dsn.split('.').map(|p| p.parse::<u16>().ok());
    let (Some(Some(class)), Some(Some(subject)), Some(Some(code)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if class != 5 {
        return false;
    }
    match (subject, code) {
        (1, 1 | 2 | 3 | 6 | 10) | (2, 1) => true,
        (4, 4) => {
            let d = detail.to_ascii_lowercase();
            let Some((_, domain)) = rcpt.rsplit_once('@') else {
                return false;
            };
            // The name the lookup failed for: `name=<name> type=…` (a trailing dot is DNS's).
            let named = d
                .split_once("name=")
                .map(|(_, rest)| rest.split([' ', ':', ',']).next().unwrap_or(""))
                .map(|n| n.trim_end_matches('.'));
            d.contains("not found")
                && (d.contains("host") || d.contains("domain"))
                && named.is_some_and(|n| n.eq_ignore_ascii_case(domain))
        }
        _ => false,
    }
}

/// Runs `lines` through a tracker with an in-memory map (tests and the oracle's cross-check).
pub fn run_all<'a>(
    tracker: &mut Tracker,
    lines: impl IntoIterator<Item = &'a LogLine>,
) -> (Vec<Output>, BTreeMap<String, Message>) {
    let mut state: BTreeMap<String, Message> = BTreeMap::new();
    let mut out = Vec::new();
    for l in lines {
        let Some(qid) = l.qid() else { continue };
        let (next, mut o) = tracker.apply(state.remove(qid), l, 0);
        if let Some(n) = next {
            state.insert(qid.to_owned(), n);
        }
        out.append(&mut o);
    }
    (out, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postfix::parse::parse;

    const DOMAIN: &str = "deals.test";

    fn log(lines: &[String]) -> Vec<LogLine> {
        lines.iter().map(|l| parse(l)).collect()
    }

    fn l(daemon: &str, qid: &str, rest: &str) -> String {
        format!("Dec 06 02:28:12 mta pfA/{daemon}[1]: {qid}: {rest}")
    }

    fn status(daemon: &str, qid: &str, to: &str, dsn: &str, status: &str, detail: &str) -> String {
        l(
            daemon,
            qid,
            &format!(
                "to=<{to}>, relay=virtual, delay=0.06, delays=0.01/0.04/0/0.01, dsn={dsn}, status={status} ({detail})"
            ),
        )
    }

    #[test]
    fn sent_bounced_deferred_expired_and_notices() {
        let lines = log(&[
            // A: sent
            l("cleanup", "A1", "message-id=<mailA@deals.test>"),
            l(
                "qmgr",
                "A1",
                "from=<deals@deals.test>, size=3, nrcpt=1 (queue active)",
            ),
            status(
                "virtual",
                "A1",
                "alice@localhost",
                "2.0.0",
                "sent",
                "delivered to mailbox",
            ),
            l("qmgr", "A1", "removed"),
            // B: hard bounce, and its notice (from=<>), which is delivered: ignored
            l("cleanup", "B1", "message-id=<mailB@deals.test>"),
            l(
                "qmgr",
                "B1",
                "from=<deals@deals.test>, size=3, nrcpt=1 (queue active)",
            ),
            status(
                "virtual",
                "B1",
                "ghost@localhost",
                "5.1.1",
                "bounced",
                "unknown user: \"ghost@localhost\"",
            ),
            l("cleanup", "N1", "message-id=<20261206022812.N1@mta.test>"),
            l("qmgr", "N1", "from=<>, size=2156, nrcpt=1 (queue active)"),
            l("bounce", "B1", "sender non-delivery notification: N1"),
            l("qmgr", "B1", "removed"),
            status(
                "virtual",
                "N1",
                "deals@deals.test",
                "2.0.0",
                "sent",
                "delivered to mailbox",
            ),
            l("qmgr", "N1", "removed"),
            // C: deferred then expired
            l("cleanup", "C1", "message-id=<mailC@deals.test>"),
            l(
                "qmgr",
                "C1",
                "from=<deals@deals.test>, size=3, nrcpt=1 (queue active)",
            ),
            status(
                "smtp",
                "C1",
                "x@defer.test",
                "4.4.1",
                "deferred",
                "connect to 127.0.0.1[127.0.0.1]:1: Connection refused",
            ),
            l(
                "qmgr",
                "C1",
                "from=<deals@deals.test>, status=expired, returned to sender",
            ),
            l("qmgr", "C1", "removed"),
            // D: not ours
            l("cleanup", "D1", "message-id=<other@elsewhere>"),
            status(
                "virtual",
                "D1",
                "bob@localhost",
                "2.0.0",
                "sent",
                "delivered to mailbox",
            ),
        ]);
        let mut t = Tracker::new(DOMAIN);
        let (out, left) = run_all(&mut t, &lines);
        let summary: Vec<String> = out
            .iter()
            .map(|o| match o {
                Output::Status(s) => format!("status {} {:?} {}", s.mail_id, s.status, s.to),
                Output::Issue(i) => format!("issue {} {:?}", i.mail_id, i.kind),
                Output::Flag(f) => format!("flag {} {}", f.address, f.unreachable),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                "status mailA Sent alice@localhost",
                "status mailB Bounced ghost@localhost",
                "issue mailB Bounced",
                "flag ghost@localhost true",
                "status mailC Deferred x@defer.test",
                "issue mailC Deferred",
                "status mailC Failed x@defer.test",
                "issue mailC Expired",
            ]
        );
        assert_eq!(
            t.counts,
            Counts {
                matched: 3,
                unmatched: 1,
                notices: 1
            }
        );
        assert_eq!(
            left.keys().collect::<Vec<_>>(),
            vec!["D1"],
            "removed forgets"
        );
    }

    #[test]
    fn deferred_then_sent_is_not_expired_and_soft_bounces_are_not_flagged() {
        let lines = log(&[
            l("cleanup", "E1", "message-id=<mailE@deals.test>"),
            status("smtp", "E1", "x@slow.test", "4.4.1", "deferred", "later"),
            status("smtp", "E1", "x@slow.test", "2.0.0", "sent", "ok"),
            l(
                "qmgr",
                "E1",
                "from=<deals@deals.test>, status=expired, returned to sender",
            ),
            l("cleanup", "F1", "message-id=<mailF@deals.test>"),
            status("smtp", "F1", "x@odd.test", "4.7.0", "bounced", "odd"),
        ]);
        let mut t = Tracker::new(DOMAIN);
        let (out, _) = run_all(&mut t, &lines);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Status(s) if s.status == MailState::Failed))
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Flag(_))));
    }

    /// Only a bounce that says the address is bad flags it: a spam block, a relay denial, a
    /// message too big, a loop or content refusal is a bounce (status and issue) for that
    /// mail, not a flag on the address.
    #[test]
    fn only_address_class_bounces_flag() {
        let cases: &[(&str, &str, bool)] = &[
            (
                "5.1.1",
                "host mx[1.2.3.4] said: 550 5.1.1 <x>: Recipient address rejected: User unknown",
                true,
            ),
            ("5.1.2", "Host or domain name not found", true),
            ("5.1.5", "destination address valid", false),
            ("5.1.0", "other address status", false),
            ("5.1.10", "Recipient address has null MX", true),
            (
                "5.2.1",
                "host mx said: 550 5.2.1 The email account that you tried to reach is disabled",
                true,
            ),
            (
                "5.4.4",
                "Host or domain name not found. Name service error for name=example.test type=MX: Host not found",
                true,
            ),
            (
                "5.4.4",
                "Host or domain name not found. Name service error for name=EXAMPLE.test. type=A: Host not found",
                true,
            ),
            // A relay whose name does not resolve (a mistyped relayhost): not the address.
            (
                "5.4.4",
                "Host or domain name not found. Name service error for name=relay.example.net type=A: Host not found",
                false,
            ),
            ("5.4.4", "Host or domain name not found", false),
            (
                "5.7.1",
                "host gmail-smtp-in.l.google.com said: 550 5.7.1 blocked using Spamhaus",
                false,
            ),
            (
                "5.7.1",
                "host relay said: 554 5.7.1 <x>: Relay access denied",
                false,
            ),
            (
                "5.3.4",
                "host mx said: 552 5.3.4 Message size exceeds fixed limit",
                false,
            ),
            ("5.2.3", "message too big", false),
            ("5.4.6", "mail forwarding loop for x@localhost", false),
            ("5.4.4", "unable to route: no mail hosts for domain", false),
            (
                "5.1.7",
                "host mx said: 553 5.1.7 sender address invalid",
                false,
            ),
            ("5.6.0", "content rejected", false),
        ];
        assert!(!flags_address("5.x.1", "Host not found", "a@b.test"));
        assert!(!flags_address("4.1.1", "User unknown", "a@b.test"));
        for (i, (dsn, detail, flags)) in cases.iter().enumerate() {
            let qid = format!("G{i}");
            let lines = log(&[
                l(
                    "cleanup",
                    &qid,
                    &format!("message-id=<mailG{i}@deals.test>"),
                ),
                status("smtp", &qid, "someone@example.test", dsn, "bounced", detail),
            ]);
            let mut t = Tracker::new(DOMAIN);
            let (out, _) = run_all(&mut t, &lines);
            let kinds: Vec<&str> = out
                .iter()
                .map(|o| match o {
                    Output::Status(s) if s.status == MailState::Bounced => "bounced",
                    Output::Status(_) => "other status",
                    Output::Issue(i) if i.kind == IssueKind::Bounced => "issue",
                    Output::Issue(_) => "other issue",
                    Output::Flag(_) => "flag",
                })
                .collect();
            let want: &[&str] = if *flags {
                &["bounced", "issue", "flag"]
            } else {
                &["bounced", "issue"]
            };
            assert_eq!(kinds, want, "dsn {dsn} ({detail})");
        }
    }
}
