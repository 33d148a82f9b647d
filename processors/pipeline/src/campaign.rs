//! Marketing campaigns (seed 003: a broadcast to many users): what a campaign tool writes to
//! `campaign-requests`, read by `spool-notifications`' `campaigns` lane (throttled, paused and
//! resumed by an operator, each user's quiet hours honoured), beside the alerts lane.
//!
//! A campaign is one e-mail to every user who receives e-mail (has an address and the e-mail
//! channel): marketing goes by e-mail, not by push or webhook. Notification ids are
//! [`crate::ids::notification_id`] of (campaign id, user, e-mail), so writing the same
//! campaign twice delivers nothing twice (the id is the idempotency key). Addresses flagged
//! unreachable (`address-status`, [`crate::publish::flagged_addresses`]) are left out, as
//! matching leaves them out of alerts; an address flagged after the campaign was written is
//! still mailed (the flag is not checked again at sending). Addresses are normalised as
//! matching normalises them ([`crate::matching::normalize`]: trimmed, ASCII lowercase; empty
//! is none) before the flag check and in the request, so `" Bob@X.com"` is checked (and
//! mailed) as `bob@x.com`.

use std::collections::BTreeSet;

use crate::events::{AlertSettings, CampaignInfo, Channel, NotificationKind, NotificationRequest};
use crate::ids;

/// The campaign's requests, one per e-mail user whose address (normalised: trimmed, ASCII
/// lowercase) is not in `flagged` (normalised the same way), in the order of `users`.
pub fn requests(
    campaign: &CampaignInfo,
    users: &[AlertSettings],
    flagged: &BTreeSet<String>,
    at_ms: i64,
) -> Vec<NotificationRequest> {
    users
        .iter()
        .filter(|u| u.channels.contains(&Channel::Email))
        .filter_map(|u| {
            let address = u
                .email
                .as_deref()
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())?;
            if flagged.contains(&address) {
                return None;
            }
            Some(NotificationRequest {
                id: ids::notification_id(&campaign.id, &u.user, Channel::Email),
                kind: NotificationKind::Campaign,
                user: u.user.clone(),
                user_name: u.name.clone(),
                channel: Channel::Email,
                address,
                time_zone: u.time_zone.clone(),
                quiet_hours: u.quiet_hours,
                deal: None,
                campaign: Some(campaign.clone()),
                at_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::{Endpoints, Feed, FeedConfig};

    #[test]
    fn one_mail_per_email_user_with_deterministic_ids() {
        let feed = Feed::new(FeedConfig {
            products: 10,
            users: 200,
            ..FeedConfig::default()
        });
        let users = feed.users(&Endpoints {
            webhook: "http://h".into(),
            push: "http://p".into(),
        });
        let c = CampaignInfo {
            id: "spring".into(),
            title: "Spring sale".into(),
            body: "<b>20%</b> off".into(),
        };
        let none = BTreeSet::new();
        let r = requests(&c, &users, &none, 7);
        let mailed = users
            .iter()
            .filter(|u| u.channels.contains(&Channel::Email))
            .count();
        assert!(mailed < users.len(), "some users take no e-mail");
        assert_eq!(r.len(), mailed);
        // A flagged address (flags are lowercase) is left out.
        let first = r[0].address.to_uppercase();
        let flagged: BTreeSet<String> = [first.to_lowercase()].into();
        let without = requests(&c, &users, &flagged, 7);
        assert_eq!(without.len(), mailed - 1);
        assert!(without.iter().all(|n| n.address != r[0].address));
        assert!(r.iter().all(|n| n.kind == NotificationKind::Campaign
            && n.channel == Channel::Email
            && n.campaign.as_ref() == Some(&c)));
        assert_eq!(r, requests(&c, &users, &none, 7), "deterministic");
        let other = requests(
            &CampaignInfo {
                id: "autumn".into(),
                ..c.clone()
            },
            &users,
            &none,
            7,
        );
        assert_ne!(r[0].id, other[0].id);
    }

    /// An address with spaces or capitals (as a site may store it) is normalised as matching
    /// does: a flag on it holds (it used to escape the check, `to_lowercase` without a trim,
    /// and lettre then refused the untrimmed address as a dead letter), and the request
    /// carries the clean address. A blank address is no address.
    #[test]
    fn addresses_are_normalised_as_matching_does() {
        let user = |id: &str, email: &str| AlertSettings {
            user: id.into(),
            name: id.into(),
            categories: vec!["books".into()],
            min_drop_bp: 1_000,
            channels: vec![Channel::Email],
            email: Some(email.into()),
            webhook_url: None,
            push_url: None,
            time_zone: "UTC".into(),
            quiet_hours: None,
            at_ms: 1,
        };
        let users = [
            user("u1", " Bob@X.com"),
            user("u2", "Alice@Example.ORG "),
            user("u3", "   "),
        ];
        let c = CampaignInfo {
            id: "c".into(),
            title: "t".into(),
            body: "b".into(),
        };
        let flagged: BTreeSet<String> = ["bob@x.com".to_owned()].into();
        let r = requests(&c, &users, &flagged, 1);
        let got: Vec<(&str, &str)> = r
            .iter()
            .map(|n| (n.user.as_str(), n.address.as_str()))
            .collect();
        assert_eq!(got, vec![("u2", "alice@example.org")]);
    }
}
