//! One line of Postfix's log (`maillog_file`) → a [`LogLine`].
//!
//! The grammar is the recipe's (`shared/reference/postfix.md`, "Parser rules"): per-recipient
//! status lines (`to=<..>, [orig_to=<..>,] relay=.., [conn_use=..,] delay=.., delays=..,
//! dsn=X.Y.Z, status=WORD (TEXT)`), the cleanup daemon's `message-id=`, the queue manager's
//! `from=<..>, size=.., nrcpt=..` (an empty sender marks a bounce notice), `status=expired`,
//! `removed`, and the bounce daemon's link from a message to its notice. Everything else
//! (connects, `client=`, warnings, `NOQUEUE: reject`, lines without a queue id) is
//! [`LogLine::Other`]. Queue ids match `[0-9A-Za-z]+` (long and short forms).
//!
//! Parsing never fails: a line it does not understand is `Other`, and lines are bounded by
//! the tailer before they get here.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// A recipient's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RcptStatus {
    /// Delivered (final).
    Sent,
    /// Temporarily failed; retried or later expired.
    Deferred,
    /// Permanently failed (final).
    Bounced,
}

/// What a log line says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "line")]
pub enum LogLine {
    /// `QID: to=<..>, ..., dsn=.., status=.. (detail)`.
    Status {
        /// Queue id.
        qid: String,
        /// Recipient as delivered.
        to: String,
        /// Recipient as given at RCPT TO, when it was rewritten.
        orig_to: Option<String>,
        /// The daemon that logged it (`virtual`, `smtp`, `error`, ...).
        daemon: String,
        /// Relay field.
        relay: String,
        /// DSN code.
        dsn: String,
        /// Status.
        status: RcptStatus,
        /// The parenthesised text.
        detail: String,
    },
    /// `cleanup[..]: QID: message-id=<..>`.
    MessageId {
        /// Queue id.
        qid: String,
        /// The Message-ID, without brackets.
        message_id: String,
    },
    /// `qmgr[..]: QID: from=<..>, size=.., nrcpt=N (queue active)`.
    QueueActive {
        /// Queue id.
        qid: String,
        /// Envelope sender; empty for bounce notices.
        from: String,
    },
    /// `qmgr[..]: QID: from=<..>, status=expired, returned to sender`.
    Expired {
        /// Queue id.
        qid: String,
    },
    /// `bounce[..]: QID: sender non-delivery notification: NDRQID`.
    NonDeliveryNotice {
        /// The bounced message.
        qid: String,
        /// The notice's own queue id.
        notice_qid: String,
    },
    /// `qmgr[..]: QID: removed`.
    Removed {
        /// Queue id.
        qid: String,
    },
    /// Anything else (ignored).
    Other,
}

impl LogLine {
    /// The queue id the line is about (the partitioning key), if any.
    pub fn qid(&self) -> Option<&str> {
        match self {
            LogLine::Status { qid, .. }
            | LogLine::MessageId { qid, .. }
            | LogLine::QueueActive { qid, .. }
            | LogLine::Expired { qid }
            | LogLine::NonDeliveryNotice { qid, .. }
            | LogLine::Removed { qid } => Some(qid),
            LogLine::Other => None,
        }
    }
}

/// `MMM DD HH:MM:SS host syslog_name/daemon[pid]: ` then the message.
static PREFIX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\S+ +\d+ [\d:]+ \S+ (?:[^ /\[]+/)*([^ /\[]+)\[\d+\]: ([0-9A-Za-z]+): (.*)$")
        .expect("valid")
});
static STATUS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^to=<([^>]*)>, (?:orig_to=<([^>]*)>, )?relay=([^,]+), (?:conn_use=\d+, )?delay=[\d.]+, delays=[\d./]+, dsn=(\d\.\d+\.\d+), status=(\w+) \((.*)\)$",
    )
    .expect("valid")
});
static MESSAGE_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^message-id=<?([^>]*)>?$").expect("valid"));
static FROM_ACTIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^from=<([^>]*)>, size=\d+, nrcpt=\d+ \(queue active\)$").expect("valid")
});
static EXPIRED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^from=<[^>]*>, status=expired, returned to sender$").expect("valid")
});
static NDR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^sender non-delivery notification: ([0-9A-Za-z]+)$").expect("valid")
});

/// Parses one line (without its newline).
pub fn parse(line: &str) -> LogLine {
    let Some(c) = PREFIX.captures(line) else {
        return LogLine::Other;
    };
    let daemon = &c[1];
    let qid = c[2].to_owned();
    let rest = &c[3];
    if qid == "NOQUEUE" || qid == "warning" {
        return LogLine::Other;
    }
    if let Some(s) = STATUS.captures(rest) {
        let status = match &s[5] {
            "sent" => RcptStatus::Sent,
            "deferred" => RcptStatus::Deferred,
            "bounced" => RcptStatus::Bounced,
            _ => return LogLine::Other, // e.g. "undeliverable" from address verification
        };
        return LogLine::Status {
            qid,
            to: s[1].to_owned(),
            orig_to: s.get(2).map(|m| m.as_str().to_owned()),
            daemon: daemon.to_owned(),
            relay: s[3].to_owned(),
            dsn: s[4].to_owned(),
            status,
            detail: s[6].to_owned(),
        };
    }
    if daemon == "cleanup"
        && let Some(m) = MESSAGE_ID.captures(rest)
    {
        return LogLine::MessageId {
            qid,
            message_id: m[1].to_owned(),
        };
    }
    if daemon == "qmgr" {
        if let Some(m) = FROM_ACTIVE.captures(rest) {
            return LogLine::QueueActive {
                qid,
                from: m[1].to_owned(),
            };
        }
        if EXPIRED.is_match(rest) {
            return LogLine::Expired { qid };
        }
        if rest == "removed" {
            return LogLine::Removed { qid };
        }
    }
    if daemon == "bounce"
        && let Some(m) = NDR.captures(rest)
    {
        return LogLine::NonDeliveryNotice {
            qid,
            notice_qid: m[1].to_owned(),
        };
    }
    LogLine::Other
}

/// The queue id in an SMTP DATA reply (`250 2.0.0 Ok: queued as QID`), from its text lines.
pub fn queued_as<'a>(reply_lines: impl IntoIterator<Item = &'a str>) -> Option<String> {
    static QUEUED: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"queued as ([0-9A-Za-z]+)").expect("valid"));
    reply_lines
        .into_iter()
        .find_map(|l| QUEUED.captures(l).map(|c| c[1].to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recipe's example log, verbatim.
    pub(crate) const RECIPE_LOG: &str = "\
Dec 06 02:28:12 mta pfA/smtpd[16563]: DF79098C591: client=localhost[127.0.0.1]
Dec 06 02:28:12 mta pfA/cleanup[16566]: DF79098C591: message-id=<20261206022812.DF79098C591@mta.test>
Dec 06 02:28:12 mta pfA/qmgr[16076]: DF79098C591: from=<sender@localhost>, size=327, nrcpt=1 (queue active)
Dec 06 02:28:12 mta pfA/virtual[16567]: DF79098C591: to=<alice@localhost>, relay=virtual, delay=0.06, delays=0.01/0.04/0/0.01, dsn=2.0.0, status=sent (delivered to mailbox)
Dec 06 02:28:12 mta pfA/qmgr[16076]: DF79098C591: removed
Dec 06 02:28:12 mta pfA/virtual[16570]: E050C98C043: to=<nosuchuser@localhost>, relay=virtual, delay=0.04, delays=0/0.03/0/0.01, dsn=5.1.1, status=bounced (unknown user: \"nosuchuser@localhost\")
Dec 06 02:28:12 mta pfA/cleanup[16566]: EADEF98C613: message-id=<20261206022812.EADEF98C613@mta.test>
Dec 06 02:28:12 mta pfA/qmgr[16076]: EADEF98C613: from=<>, size=2156, nrcpt=1 (queue active)
Dec 06 02:28:12 mta pfA/bounce[16571]: E050C98C043: sender non-delivery notification: EADEF98C613
Dec 06 02:28:12 mta pfA/qmgr[16076]: E050C98C043: removed
Dec 06 02:28:12 mta pfA/virtual[16570]: EADEF98C613: to=<sender@localhost>, relay=virtual, delay=0.01, delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to mailbox)
Dec 06 02:28:12 mta pfA/qmgr[16076]: EADEF98C613: removed";

    #[test]
    fn the_recipes_example_log() {
        let got: Vec<LogLine> = RECIPE_LOG.lines().map(parse).collect();
        assert_eq!(got[0], LogLine::Other, "client= is ignored");
        assert_eq!(
            got[1],
            LogLine::MessageId {
                qid: "DF79098C591".into(),
                message_id: "20261206022812.DF79098C591@mta.test".into()
            }
        );
        assert_eq!(
            got[2],
            LogLine::QueueActive {
                qid: "DF79098C591".into(),
                from: "sender@localhost".into()
            }
        );
        assert!(
            matches!(&got[3], LogLine::Status { qid, to, status: RcptStatus::Sent, dsn, daemon, .. }
            if qid == "DF79098C591" && to == "alice@localhost" && dsn == "2.0.0" && daemon == "virtual")
        );
        assert_eq!(
            got[4],
            LogLine::Removed {
                qid: "DF79098C591".into()
            }
        );
        assert!(
            matches!(&got[5], LogLine::Status { status: RcptStatus::Bounced, dsn, detail, .. }
            if dsn == "5.1.1" && detail == "unknown user: \"nosuchuser@localhost\"")
        );
        assert_eq!(
            got[7],
            LogLine::QueueActive {
                qid: "EADEF98C613".into(),
                from: String::new()
            }
        );
        assert_eq!(
            got[8],
            LogLine::NonDeliveryNotice {
                qid: "E050C98C043".into(),
                notice_qid: "EADEF98C613".into()
            }
        );
    }

    #[test]
    fn every_recipient_outcome_of_the_recipe() {
        let deferred = "Dec 06 02:30:01 mta pfA/smtp[17001]: 4jhq2P559gz1Spyy: to=<x@defer.test>, relay=none, delay=0.01, delays=0/0/0.01/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:1: Connection refused)";
        assert!(
            matches!(parse(deferred), LogLine::Status { status: RcptStatus::Deferred, qid, dsn, .. } if qid == "4jhq2P559gz1Spyy" && dsn == "4.4.1")
        );
        let suspended = "Dec 06 02:30:01 mta pfA/error[17002]: 4jhq2P559gz1Spyz: to=<x@defer.test>, relay=none, delay=0, delays=0/0/0/0, dsn=4.4.1, status=deferred (delivery temporarily suspended: connect to 127.0.0.1[127.0.0.1]:1: Connection refused)";
        assert!(
            matches!(parse(suspended), LogLine::Status { status: RcptStatus::Deferred, daemon, .. } if daemon == "error")
        );
        let soft = "Dec 06 02:30:01 mta pfA/error[17002]: 4jhq2P559gz1Spz0: to=<x@softfail.test>, relay=none, delay=0, delays=0/0/0/0, dsn=4.2.0, status=deferred (try again later)";
        assert!(matches!(parse(soft), LogLine::Status { dsn, .. } if dsn == "4.2.0"));
        let expired = "Dec 06 02:30:01 mta pfA/qmgr[16076]: 4jhq2P559gz1Spyy: from=<sender@localhost>, status=expired, returned to sender";
        assert_eq!(
            parse(expired),
            LogLine::Expired {
                qid: "4jhq2P559gz1Spyy".into()
            }
        );
        let hard = "Dec 06 02:30:01 mta pfA/error[17003]: 4jhq2P559gz1Spz1: to=<x@hardbounce.test>, relay=none, delay=0.01, delays=0/0/0/0, dsn=5.1.1, status=bounced (mailbox does not exist)";
        assert!(matches!(
            parse(hard),
            LogLine::Status {
                status: RcptStatus::Bounced,
                ..
            }
        ));
        let noroute = "Dec 06 02:30:01 mta pfA/error[17003]: 4jhq2P559gz1Spz2: to=<x@example.org>, relay=none, delay=0.01, delays=0/0/0/0, dsn=5.4.4, status=bounced (no route in test setup)";
        assert!(matches!(parse(noroute), LogLine::Status { dsn, .. } if dsn == "5.4.4"));
        let orig = "Dec 06 02:30:01 mta pfA/virtual[1]: 4jhq2P559gz1Spz3: to=<bad@localhost>, orig_to=<bad>, relay=virtual, conn_use=2, delay=0.04, delays=0/0.03/0/0.01, dsn=5.1.1, status=bounced (unknown user: \"bad@localhost\")";
        assert!(matches!(parse(orig), LogLine::Status { orig_to: Some(o), .. } if o == "bad"));
    }

    #[test]
    fn lines_to_ignore() {
        for l in [
            "Dec 06 02:28:12 mta pfA/smtpd[16563]: connect from localhost[127.0.0.1]",
            "Dec 06 02:28:12 mta pfA/smtpd[16563]: disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
            "Dec 06 02:28:12 mta pfA/smtp[16563]: connect to 127.0.0.1[127.0.0.1]:1: Connection refused",
            "Dec 06 02:28:12 mta pfA/postfix-script[1]: starting the Postfix mail system",
            "Dec 06 02:28:12 mta pfA/master[1]: daemon started -- version 3.7.11, configuration /tmp/x/etc",
            "Dec 06 02:28:12 mta pfA/smtpd[16563]: warning: hostname localhost does not resolve to address 127.0.0.1",
            "Dec 06 02:28:12 mta pfA/smtpd[16563]: NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 <bad@localhost>: Recipient address rejected",
            "Dec 06 02:28:12 mta pfA/smtpd[16563]: DF79098C591: client=localhost[127.0.0.1]",
            "",
            "garbage \u{0} line",
        ] {
            assert_eq!(parse(l), LogLine::Other, "{l}");
        }
    }

    #[test]
    fn queue_id_from_the_data_reply() {
        assert_eq!(
            queued_as(["2.0.0 Ok: queued as 4jhq2P559gz1Spyy"]),
            Some("4jhq2P559gz1Spyy".into())
        );
        assert_eq!(queued_as(["2.0.0 Ok"]), None);
    }
}
