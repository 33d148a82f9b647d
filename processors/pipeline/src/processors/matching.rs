//! `spool-matching`: [`crate::matching`] over the runtime's store `m` of the task (a user
//! partition). Inputs, co-partitioned by partition number: `user-settings` (CloudEvents;
//! a tombstone deletes the user), `address-status` (every flag in every partition) and
//! `deal-broadcast` (every transition in every partition). Emits notification requests and
//! timeline events in the input's transaction. Settings and flags are the runtime's `tables`
//! ([`check_tables`]): read up to date before each deal, whatever order the broker delivers
//! the topics in.
//!
//! Keys of `m`: `s\0USER` settings (JSON), `i\0CATEGORY\0MINDROP(5 digits)\0USER` the audience
//! index, `a\0ADDRESS` flags, `n\0PRODUCT\0USER` → entry for the users notified of a deal.

use bytes::Bytes;
use serde::Deserialize;
use spool_processor::{Context, Failure, Handler, Input};

use crate::events::{AddressStatus, AlertSettings, BasisPoints, DealTransition, TimelineOp};
use crate::matching::{Audience, Matcher, MatchingStore, Output};
use crate::processors::emit_owned;
use crate::topics;

const STORE: &str = "m";

/// `[app]` of `spool-matching`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchingSettings {
    /// Most users of one category in one partition (bounds one deal's fan-out in memory).
    pub max_audience: usize,
}

impl Default for MatchingSettings {
    fn default() -> Self {
        MatchingSettings {
            max_audience: 1_000_000,
        }
    }
}

/// The matching processor.
#[derive(Debug, Default)]
pub struct Matching {
    settings: MatchingSettings,
}

impl Matching {
    /// A processor with these settings.
    pub fn new(settings: MatchingSettings) -> Matching {
        Matching { settings }
    }
}

/// [`MatchingStore`] over a task's store.
struct TaskStore<'x, 'c> {
    ctx: &'x mut Context<'c>,
    max_audience: usize,
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

impl MatchingStore for TaskStore<'_, '_> {
    type Error = Failure;
    fn settings(&mut self, user: &str) -> Result<Option<AlertSettings>, Failure> {
        self.ctx.store(STORE)?.get_json(&key(&["s", user]))
    }
    fn put_settings(&mut self, user: &str, settings: Option<AlertSettings>) -> Result<(), Failure> {
        let mut s = self.ctx.store(STORE)?;
        match settings {
            Some(v) => s.put_json(&key(&["s", user]), &v),
            None => {
                s.delete(&key(&["s", user]));
                Ok(())
            }
        }
    }
    fn index(&mut self, category: &str, e: &Audience, present: bool) -> Result<(), Failure> {
        let k = key(&["i", category, &format!("{:05}", e.min_drop_bp), &e.user]);
        let mut s = self.ctx.store(STORE)?;
        if present {
            s.put(&k, Bytes::new());
        } else {
            s.delete(&k);
        }
        Ok(())
    }
    fn audience(
        &mut self,
        category: &str,
        max_drop: BasisPoints,
        visit: &mut dyn FnMut(&Audience),
    ) -> Result<(), Failure> {
        let mut prefix = key(&["i", category]);
        prefix.push(0);
        let entries = self
            .ctx
            .store(STORE)?
            .scan_prefix(&prefix, self.max_audience + 1)?;
        if entries.len() > self.max_audience {
            return Err(Failure::fatal(format!(
                "category {category:?} has more than [app] max_audience = {} users in this partition: raise it or add partitions",
                self.max_audience
            )));
        }
        for (k, _) in entries {
            let rest = String::from_utf8_lossy(&k[prefix.len()..]);
            let Some((min, user)) = rest.split_once('\0') else {
                continue;
            };
            let Ok(min) = min.parse::<BasisPoints>() else {
                continue;
            };
            if min > max_drop {
                break; // keys are ordered by the zero-padded minimum drop
            }
            visit(&Audience {
                min_drop_bp: min,
                user: user.to_owned(),
            });
        }
        Ok(())
    }
    fn unreachable(&mut self, address: &str) -> Result<bool, Failure> {
        Ok(self.ctx.store(STORE)?.get(&key(&["a", address]))?.is_some())
    }
    fn set_unreachable(&mut self, address: &str, flagged: bool) -> Result<(), Failure> {
        let mut s = self.ctx.store(STORE)?;
        if flagged {
            s.put(&key(&["a", address]), Bytes::from_static(b"1"));
        } else {
            s.delete(&key(&["a", address]));
        }
        Ok(())
    }
    fn add_notified(&mut self, product: &str, user: &str, entry: &str) -> Result<(), Failure> {
        self.ctx
            .store(STORE)?
            .put(&key(&["n", product, user]), entry.to_owned());
        Ok(())
    }
    fn take_notified(&mut self, product: &str) -> Result<Vec<(String, String)>, Failure> {
        let mut prefix = key(&["n", product]);
        prefix.push(0);
        let mut s = self.ctx.store(STORE)?;
        let entries = s.scan_prefix(&prefix, self.max_audience + 1)?;
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let user = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            s.delete(&k);
            out.push((user, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }
}

/// Matching joins each deal with the settings and flags written before it, so both must be
/// read as tables (`tables = ["user-settings", "address-status"]` in its configuration):
/// otherwise a (re)start with a backlog can match deals against settings not read yet.
pub fn check_tables(tables: &[String]) -> anyhow::Result<()> {
    for t in [topics::USER_SETTINGS, topics::ADDRESS_STATUS] {
        anyhow::ensure!(
            tables.iter().any(|x| x == t),
            "tables must list {t:?}: matching joins each deal with the settings and flags written before it"
        );
    }
    Ok(())
}

impl Handler for Matching {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let topic = input.topic.to_string();
        let max_audience = self.settings.max_audience;
        match topic.as_str() {
            topics::USER_SETTINGS => {
                let user = input
                    .key_str()
                    .ok_or_else(|| {
                        Failure::dead_letter("user-settings record without a UTF-8 key")
                    })?
                    .to_owned();
                let settings = match input.value {
                    None => None,
                    Some(_) => Some(input.data::<AlertSettings>()?),
                };
                if let Some(s) = &settings
                    && s.user != user
                {
                    return Err(Failure::dead_letter(format!(
                        "settings of {} under key {user}",
                        s.user
                    )));
                }
                Matcher::new(TaskStore { ctx, max_audience }).on_settings(&user, settings)
            }
            topics::ADDRESS_STATUS => {
                let Some(_) = input.value else { return Ok(()) };
                let s: AddressStatus = input.data::<AddressStatus>()?;
                Matcher::new(TaskStore { ctx, max_audience }).on_address_status(&s)
            }
            topics::DEAL_BROADCAST => {
                let t: DealTransition = input.data::<DealTransition>()?;
                let outputs = Matcher::new(TaskStore { ctx, max_audience }).on_transition(&t)?;
                for o in outputs {
                    match o {
                        Output::Notify(n) => {
                            let (id, at) = (n.id.clone(), n.at_ms);
                            emit_owned(ctx, id, n, at)?;
                        }
                        Output::Timeline(e) => {
                            let op = if e.op == TimelineOp::Add {
                                "add"
                            } else {
                                "remove"
                            };
                            let (id, at) = (format!("{}:{}:{op}", e.entry, e.user), e.at_ms);
                            emit_owned(ctx, id, e, at)?;
                        }
                    }
                }
                Ok(())
            }
            other => Err(Failure::dead_letter(format!(
                "matching does not read {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use spool_processor::testing::TestDriver;

    use super::*;
    use crate::events::{Channel, NotificationRequest, TimelineEvent, TransitionKind};
    use crate::processors::envelope;

    fn settings(user: &str, min: BasisPoints, email: &str) -> AlertSettings {
        AlertSettings {
            user: user.into(),
            name: user.into(),
            categories: vec!["books".into()],
            min_drop_bp: min,
            channels: vec![Channel::Email, Channel::Push],
            email: Some(email.into()),
            webhook_url: None,
            push_url: Some(format!("http://push/{user}")),
            time_zone: "UTC".into(),
            quiet_hours: None,
            at_ms: 0,
        }
    }

    fn transition(kind: TransitionKind, drop: BasisPoints) -> DealTransition {
        DealTransition {
            id: "p1:1".into(),
            product: "p1".into(),
            episode: 1,
            kind,
            category: "books".into(),
            name: "Book".into(),
            price: 700,
            reference: 1000,
            drop_bp: drop,
            merchant: "m1".into(),
            at_ms: 5,
        }
    }

    #[test]
    fn fan_out_flags_removals_and_restart() {
        let mut d = TestDriver::new("matching", Matching::default())
            .with_topic(topics::USER_SETTINGS, 1)
            .with_topic(topics::ADDRESS_STATUS, 1)
            .with_topic(topics::DEAL_BROADCAST, 1);
        for (u, min, email) in [
            ("u1", 1000, "u1@localhost"),
            ("u2", 2500, "u2@localhost"),
            ("u3", 5000, "u3@localhost"),
        ] {
            d.pipe_event(
                topics::USER_SETTINGS,
                &envelope("app", u, &settings(u, min, email), 0),
            );
        }
        let flag = AddressStatus {
            address: "u2@localhost".into(),
            unreachable: true,
            reason: "5.1.1".into(),
            mail_id: None,
            at_ms: 1,
        };
        d.pipe_event(topics::ADDRESS_STATUS, &envelope("bounces", "f1", &flag, 1));
        d.restart(); // the index, settings and flags come back from the changelog
        d.pipe_event(
            topics::DEAL_BROADCAST,
            &envelope("deals", "t1", &transition(TransitionKind::Entered, 3000), 5),
        );
        let mut n: Vec<(String, Channel)> = d
            .read_events::<NotificationRequest>(topics::NOTIFICATION_REQUESTS)
            .into_iter()
            .map(|e| (e.data.user, e.data.channel))
            .collect();
        n.sort();
        assert_eq!(
            n,
            vec![
                ("u1".into(), Channel::Email),
                ("u1".into(), Channel::Push),
                ("u2".into(), Channel::Push)
            ],
            "u2's address is flagged; u3 wants 50 %"
        );
        let adds = d.read_events::<TimelineEvent>(topics::TIMELINE);
        assert_eq!(adds.len(), 2);
        // A tombstone deletes u1: still notified of p1, so the removal reaches them.
        d.pipe_record(spool_processor::testing::TestRecord {
            topic: topics::USER_SETTINGS.into(),
            key: Some(Bytes::from_static(b"u1")),
            value: None,
            ..Default::default()
        });
        d.pipe_event(
            topics::DEAL_BROADCAST,
            &envelope("deals", "t2", &transition(TransitionKind::Left, 0), 6),
        );
        let removes: Vec<String> = d
            .read_events::<TimelineEvent>(topics::TIMELINE)
            .into_iter()
            .map(|e| e.data.user)
            .collect();
        assert_eq!(removes, vec!["u1", "u2"]);
        // A settings record under the wrong key is a dead letter.
        d.pipe_event(
            topics::USER_SETTINGS,
            &envelope("app", "x", &settings("u9", 0, "a@b"), 0).key("u8"),
        );
        assert_eq!(d.dead_letters(topics::USER_SETTINGS).len(), 1);
    }
}
