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
//! still mailed (the flag is not checked again at sending).

use std::collections::BTreeSet;

use crate::events::{AlertSettings, CampaignInfo, Channel, NotificationKind, NotificationRequest};
use crate::ids;

/// The campaign's requests, one per e-mail user whose address is not in `flagged`
/// (lowercase addresses), in the order of `users`.
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
            let address = u.email.clone()?;
            if flagged.contains(&address.to_lowercase()) {
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
}
