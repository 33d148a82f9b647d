//! Deterministic ids.
//!
//! A notification id is a function of what caused it (the entering transition or the
//! campaign), the user and the channel, nothing else: reprocessing the same transition (after a
//! crash, a redrive, a replay) yields the same ids, so the idempotency check in notifications
//! recognises work already done. Mail ids are the notification id (one e-mail per e-mail
//! notification), which also makes the Message-ID header deterministic.

use sha2::{Digest, Sha256};

use crate::events::Channel;

/// 128 bits of SHA-256 over length-prefixed parts, as 32 lowercase hex digits.
fn digest(domain: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in std::iter::once(&domain).chain(parts) {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let out = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &out[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

/// The id of the notification of `cause` (a transition id or a campaign id) to `user` on
/// `channel`.
pub fn notification_id(cause: &str, user: &str, channel: Channel) -> String {
    digest("notification/v1", &[cause, user, channel.as_str()])
}

/// The deal transition id: `{product}:{episode}`.
pub fn transition_id(product: &str, episode: u32) -> String {
    format!("{product}:{episode}")
}

/// Our mail id for an e-mail notification.
pub fn mail_id(notification: &str) -> String {
    notification.to_owned()
}

/// The Message-ID header value for a mail id (without angle brackets).
pub fn message_id(mail_id: &str, domain: &str) -> String {
    format!("{mail_id}@{domain}")
}

/// The mail id in a Message-ID (`<id@domain>` or `id@domain`) if it has our domain.
pub fn mail_id_from_message_id<'a>(message_id: &'a str, domain: &str) -> Option<&'a str> {
    let m = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let (id, d) = m.rsplit_once('@')?;
    (d.eq_ignore_ascii_case(domain) && !id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = notification_id("p1:1", "u1", Channel::Email);
        assert_eq!(a, notification_id("p1:1", "u1", Channel::Email));
        assert_eq!(a.len(), 32);
        assert_ne!(a, notification_id("p1:1", "u1", Channel::Push));
        assert_ne!(a, notification_id("p1:2", "u1", Channel::Email));
        // Length prefixes: moving a boundary changes the id.
        assert_ne!(notification_id("p1:1u", "1", Channel::Email), a);
        // Pinned: a change of the derivation would re-send everything after an upgrade
        // (SHA-256 over the length-prefixed parts, first 16 bytes in lowercase hex).
        assert_eq!(a, "a62511bc3edc1d7ebd3f9c69533eb0c0");
    }

    #[test]
    fn message_ids_round_trip() {
        let m = message_id("abc", "deals.example");
        assert_eq!(
            mail_id_from_message_id(&format!("<{m}>"), "deals.example"),
            Some("abc")
        );
        assert_eq!(
            mail_id_from_message_id("<x@mta.test>", "deals.example"),
            None
        );
        assert_eq!(mail_id_from_message_id("nonsense", "deals.example"), None);
    }
}
