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
//!
//! A deal's fan-out is encoded as it is found ([`FanOutEncoder`]): the deal's JSON and the
//! events' shared attributes once per deal, not once per output; the records are byte for byte
//! what [`emit_owned`] writes for the same events (tested). Users' settings are decoded once
//! and kept decoded ([`SettingsCache`]) next to the stored bytes they came from: a cached value
//! is used only while the store still holds exactly those bytes, so the store stays the one
//! source of truth (aborted transactions, restores, other partitions need no invalidation).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use spool_processor::envelope::SharedAttributes;
use spool_processor::{Context, Failure, Handler, Input};

use crate::events::{
    AddressStatus, AlertSettings, BasisPoints, Channel, DealTransition, Event, NotificationKind,
    NotificationRequest, QuietHours, TimelineEvent, TimelineOp, TransitionKind,
};
use crate::ids::notification_id;
use crate::matching::{Audience, FanOut, Matcher, MatchingStore, deal_info};
use crate::processors::emit_owned;
use crate::topics;

const STORE: &str = "m";

/// `[app]` of `spool-matching`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchingSettings {
    /// Most users of one category in one partition a deal may reach (more is a fatal error:
    /// raise it or add partitions): the bound on one transaction's size.
    pub max_audience: usize,
    /// Users per handler call of a deal's fan-out or removals: a deal's outputs go out in
    /// calls of at most this many users (`Context::call_again`), all in the deal's one
    /// transaction, so one call's memory is bounded by this, not by the audience.
    pub fan_out_chunk: usize,
    /// Most users whose decoded settings are kept ([`SettingsCache`]; at the bound the cache
    /// starts over). About 0.5 KiB each.
    pub settings_cache_users: usize,
}

impl Default for MatchingSettings {
    fn default() -> Self {
        MatchingSettings {
            max_audience: 1_000_000,
            fan_out_chunk: 4096,
            settings_cache_users: 262_144,
        }
    }
}

/// The matching processor.
#[derive(Debug, Default)]
pub struct Matching {
    settings: MatchingSettings,
    cache: SettingsCache,
}

impl Matching {
    /// A processor with these settings.
    pub fn new(settings: MatchingSettings) -> Matching {
        Matching {
            settings,
            cache: SettingsCache::default(),
        }
    }
}

/// Users' settings decoded, each with the stored bytes it was decoded from (see the module
/// docs): a hit costs a comparison of those bytes instead of a JSON decode per user per deal.
#[derive(Debug, Default)]
struct SettingsCache {
    users: HashMap<String, (Bytes, Arc<AlertSettings>)>,
}

impl SettingsCache {
    /// The settings stored as `bytes` for `user`, decoded or from the cache.
    fn get(&mut self, user: &str, bytes: Bytes, max: usize) -> Result<Arc<AlertSettings>, Failure> {
        if let Some((b, s)) = self.users.get(user)
            && *b == bytes
        {
            return Ok(s.clone());
        }
        // The store holds what this processor wrote: bytes that do not decode are a bug or
        // a damaged store, not a bad input.
        let s: Arc<AlertSettings> = Arc::new(serde_json::from_slice(&bytes).map_err(|e| {
            Failure::fatal(format!(
                "store {STORE}: settings of {user:?} are not the expected JSON: {e}"
            ))
        })?);
        if max == 0 {
            return Ok(s);
        }
        if self.users.len() >= max {
            self.users.clear();
        }
        self.users.insert(user.to_owned(), (bytes, s.clone()));
        Ok(s)
    }
}

/// [`MatchingStore`] over a task's store.
struct TaskStore<'x, 'c> {
    ctx: &'x mut Context<'c>,
    cache: &'x mut SettingsCache,
    cache_users: usize,
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

impl MatchingStore for TaskStore<'_, '_> {
    type Error = Failure;
    fn settings(&mut self, user: &str) -> Result<Option<Arc<AlertSettings>>, Failure> {
        let Some(bytes) = self.ctx.store(STORE)?.get(&key(&["s", user]))? else {
            return Ok(None);
        };
        self.cache.get(user, bytes, self.cache_users).map(Some)
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
        after: Option<&Audience>,
        limit: usize,
        visit: &mut dyn FnMut(&Audience),
    ) -> Result<bool, Failure> {
        let mut prefix = key(&["i", category]);
        prefix.push(0);
        let after = after.map(|a| {
            let mut k = prefix.clone();
            k.extend_from_slice(format!("{:05}", a.min_drop_bp).as_bytes());
            k.push(0);
            k.extend_from_slice(a.user.as_bytes());
            k
        });
        let entries = self
            .ctx
            .store(STORE)?
            .scan_prefix_after(&prefix, after.as_deref(), limit)?;
        let full = entries.len() >= limit;
        for (k, _) in entries {
            let rest = String::from_utf8_lossy(&k[prefix.len()..]);
            let Some((min, user)) = rest.split_once('\0') else {
                continue;
            };
            let Ok(min) = min.parse::<BasisPoints>() else {
                continue;
            };
            if min > max_drop {
                return Ok(false); // keys are ordered by the zero-padded minimum drop
            }
            visit(&Audience {
                min_drop_bp: min,
                user: user.to_owned(),
            });
        }
        Ok(full)
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
    fn take_notified(
        &mut self,
        product: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, Failure> {
        let mut prefix = key(&["n", product]);
        prefix.push(0);
        let mut s = self.ctx.store(STORE)?;
        let entries = s.scan_prefix(&prefix, limit)?;
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

impl Matching {
    fn store<'x, 'c>(&'x mut self, ctx: &'x mut Context<'c>) -> Matcher<TaskStore<'x, 'c>> {
        Matcher::new(TaskStore {
            ctx,
            cache: &mut self.cache,
            cache_users: self.settings.settings_cache_users,
        })
    }
}

impl Handler for Matching {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        match &*input.topic {
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
                self.store(ctx).on_settings(&user, settings)
            }
            topics::ADDRESS_STATUS => {
                let Some(_) = input.value else { return Ok(()) };
                let s: AddressStatus = input.data::<AddressStatus>()?;
                self.store(ctx).on_address_status(&s)
            }
            topics::DEAL_BROADCAST => {
                let t: DealTransition = input.data::<DealTransition>()?;
                match t.kind {
                    TransitionKind::Entered => self.fan_out(ctx, &t),
                    TransitionKind::Left => self.removals(ctx, &t),
                }
            }
            other => Err(Failure::dead_letter(format!(
                "matching does not read {other}"
            ))),
        }
    }
}

impl Matching {
    /// A product entered "deal": the next `fan_out_chunk` users of its fan-out, encoded as
    /// found ([`FanOutEncoder`]); if there may be more, a call again from the last of them
    /// (cursor: [`Cursor`]).
    fn fan_out(&mut self, ctx: &mut Context<'_>, t: &DealTransition) -> Result<(), Failure> {
        let chunk = self.settings.fan_out_chunk.max(1);
        let max_audience = self.settings.max_audience;
        let cursor = ctx.resumed().map(Cursor::decode).transpose()?;
        let enc = FanOutEncoder::new(ctx.processor(), t)?;
        let after = cursor.as_ref().map(|c| &c.after);
        let mut users = cursor.as_ref().map_or(0, |c| c.users);
        let next = self.store(ctx).fan_out(t, after, chunk, &mut |store, o| {
            if let FanOut::Timeline { .. } = o {
                users += 1;
                if users > max_audience as u64 {
                    return Err(Failure::fatal(format!(
                        "category {:?} has more than [app] max_audience = {max_audience} users in this partition: raise it or add partitions",
                        t.category
                    )));
                }
            }
            let (topic, r) = enc.encode(o)?;
            store.ctx.emit(topic, r);
            Ok(())
        })?;
        if let Some(after) = next {
            ctx.call_again(Cursor { users, after }.encode());
        }
        Ok(())
    }

    /// A product left "deal": timeline removals for the next `fan_out_chunk` users notified
    /// of it; a call again if there may be more (they are taken: no cursor needed).
    fn removals(&mut self, ctx: &mut Context<'_>, t: &DealTransition) -> Result<(), Failure> {
        let chunk = self.settings.fan_out_chunk.max(1);
        let (removals, more) = self.store(ctx).removals(t, chunk)?;
        for e in removals {
            let (id, at) = (format!("{}:{}:remove", e.entry, e.user), e.at_ms);
            emit_owned(ctx, id, e, at)?;
        }
        if more {
            ctx.call_again(Bytes::new());
        }
        Ok(())
    }
}

/// Where a deal's fan-out goes on in the next call: the users done so far and the last one.
/// Encoded as `users` (u64, big-endian), `min_drop_bp` (u32, big-endian), then the user id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    users: u64,
    after: Audience,
}

impl Cursor {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + self.after.user.len());
        v.extend_from_slice(&self.users.to_be_bytes());
        v.extend_from_slice(&self.after.min_drop_bp.to_be_bytes());
        v.extend_from_slice(self.after.user.as_bytes());
        v
    }

    /// The runtime hands back what [`Cursor::encode`] gave it: anything else is a bug.
    fn decode(v: &[u8]) -> Result<Cursor, Failure> {
        let bad = || Failure::fatal("matching: a fan-out cursor that does not decode");
        let users = u64::from_be_bytes(v.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        let min = u32::from_be_bytes(
            v.get(8..12)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let user = std::str::from_utf8(&v[12..]).map_err(|_| bad())?;
        Ok(Cursor {
            users,
            after: Audience {
                min_drop_bp: min,
                user: user.to_owned(),
            },
        })
    }
}

/// An output's JSON payload.
fn json<T: Serialize>(t: &DealTransition, v: &T) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, v)
        .map_err(|e| Failure::fatal(format!("cannot encode an output of {}: {e}", t.id)))?;
    Ok(out)
}

/// [`NotificationRequest`]'s JSON with borrowed fields and the deal already encoded: the same
/// field names in the same order, so the same bytes (test `fan_out_records_equal_the_events`).
#[derive(Serialize)]
struct RequestJson<'a> {
    id: &'a str,
    kind: NotificationKind,
    user: &'a str,
    user_name: &'a str,
    channel: Channel,
    address: &'a str,
    time_zone: &'a str,
    quiet_hours: Option<QuietHours>,
    deal: Option<&'a RawValue>,
    campaign: Option<()>,
    at_ms: i64,
}

/// [`TimelineEvent`]'s JSON (an add), as [`RequestJson`].
#[derive(Serialize)]
struct TimelineJson<'a> {
    user: &'a str,
    op: TimelineOp,
    entry: &'a str,
    product: &'a str,
    deal: Option<&'a RawValue>,
    at_ms: i64,
}

/// Encodes one deal's fan-out into records: per deal once, the deal's JSON and each event
/// type's shared attributes (type, source, time); per output, its own fields.
struct FanOutEncoder<'t> {
    t: &'t DealTransition,
    deal: Box<RawValue>,
    requests: SharedAttributes,
    timeline: SharedAttributes,
}

impl<'t> FanOutEncoder<'t> {
    fn new(processor: &str, t: &'t DealTransition) -> Result<FanOutEncoder<'t>, Failure> {
        let json = serde_json::to_string(&deal_info(t))
            .and_then(RawValue::from_string)
            .map_err(|e| Failure::fatal(format!("cannot encode deal {}: {e}", t.id)))?;
        let source = format!("/bestprice/{processor}");
        Ok(FanOutEncoder {
            t,
            deal: json,
            requests: SharedAttributes::new(NotificationRequest::TYPE, &source, Some(t.at_ms)),
            timeline: SharedAttributes::new(TimelineEvent::TYPE, &source, Some(t.at_ms)),
        })
    }

    /// The record of one output, and its topic.
    fn encode(
        &self,
        o: FanOut<'_>,
    ) -> Result<(&'static str, spool_client::ProducerRecord), Failure> {
        let t = self.t;
        Ok(match o {
            FanOut::Timeline { user } => {
                let v = json(
                    t,
                    &TimelineJson {
                        user,
                        op: TimelineOp::Add,
                        entry: &t.id,
                        product: &t.product,
                        deal: Some(&self.deal),
                        at_ms: t.at_ms,
                    },
                )?;
                let id = format!("{}:{user}:add", t.id);
                (
                    TimelineEvent::TOPIC,
                    self.timeline.record(id, Some(user.to_owned()), None, v),
                )
            }
            FanOut::Notify {
                user,
                settings,
                channel,
                address,
            } => {
                let id = notification_id(&t.id, user, channel);
                let v = json(
                    t,
                    &RequestJson {
                        id: &id,
                        kind: NotificationKind::DealAlert,
                        user,
                        user_name: &settings.name,
                        channel,
                        address,
                        time_zone: &settings.time_zone,
                        quiet_hours: settings.quiet_hours,
                        deal: Some(&self.deal),
                        campaign: None,
                        at_ms: t.at_ms,
                    },
                )?;
                (
                    NotificationRequest::TOPIC,
                    self.requests.record(id, Some(user.to_owned()), None, v),
                )
            }
        })
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

    /// Users u00..u{n} with drops spread over 0–40 %, a flag, one deal entering and leaving.
    fn run_deal(chunk: usize, users: usize) -> (Vec<Vec<(String, String)>>, u64) {
        let m = Matching::new(MatchingSettings {
            fan_out_chunk: chunk,
            ..MatchingSettings::default()
        });
        let mut d = TestDriver::new("matching", m)
            .with_topic(topics::USER_SETTINGS, 1)
            .with_topic(topics::ADDRESS_STATUS, 1)
            .with_topic(topics::DEAL_BROADCAST, 1);
        for i in 0..users {
            let u = format!("u{i:02}");
            let s = settings(&u, (i as u32 % 9) * 500, &format!("{u}@localhost"));
            d.pipe_event(topics::USER_SETTINGS, &envelope("app", &u, &s, 0));
        }
        let flag = AddressStatus {
            address: "u03@localhost".into(),
            unreachable: true,
            reason: "5.1.1".into(),
            mail_id: None,
            at_ms: 1,
        };
        d.pipe_event(topics::ADDRESS_STATUS, &envelope("bounces", "f1", &flag, 1));
        let calls = d.handler_calls();
        let mut out = Vec::new();
        for (kind, at) in [(TransitionKind::Entered, 5), (TransitionKind::Left, 6)] {
            d.pipe_event(
                topics::DEAL_BROADCAST,
                &envelope("deals", format!("t{at}"), &transition(kind, 3000), at),
            );
            for topic in [topics::NOTIFICATION_REQUESTS, topics::TIMELINE] {
                out.push(
                    d.read_output(topic)
                        .into_iter()
                        .map(|r| {
                            let v = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
                            let id = r.headers.iter().find(|h| h.key == "ce_id").unwrap();
                            (
                                String::from_utf8(id.value.clone().unwrap().to_vec()).unwrap(),
                                v,
                            )
                        })
                        .collect(),
                );
            }
        }
        (out, d.handler_calls() - calls)
    }

    #[test]
    fn a_fan_out_in_chunks_emits_what_one_call_emits() {
        let (whole, calls) = run_deal(1000, 23);
        assert_eq!(calls, 2, "one call per transition");
        // 23 users, those with a minimum drop <= 30 % (i % 9 <= 6): 19; u03 gets no mail.
        assert_eq!((whole[0].len(), whole[1].len()), (37, 19));
        assert_eq!((whole[2].len(), whole[3].len()), (0, 19), "removals");
        for chunk in [1, 2, 5, 19] {
            let (chunked, calls) = run_deal(chunk, 23);
            assert_eq!(chunked, whole, "chunk {chunk}");
            // Pages of `chunk` users, then an empty one when a full page ends the audience.
            assert!(calls > 2, "chunk {chunk}: {calls} calls");
        }
    }

    #[test]
    #[should_panic(expected = "max_audience")]
    fn an_audience_over_max_audience_is_fatal_across_chunks() {
        let m = Matching::new(MatchingSettings {
            fan_out_chunk: 2,
            max_audience: 3,
            ..MatchingSettings::default()
        });
        let mut d = TestDriver::new("matching", m)
            .with_topic(topics::USER_SETTINGS, 1)
            .with_topic(topics::ADDRESS_STATUS, 1)
            .with_topic(topics::DEAL_BROADCAST, 1);
        for u in ["a", "b", "c", "d"] {
            d.pipe_event(
                topics::USER_SETTINGS,
                &envelope("app", u, &settings(u, 0, "x@y"), 0),
            );
        }
        d.pipe_event(
            topics::DEAL_BROADCAST,
            &envelope("deals", "t", &transition(TransitionKind::Entered, 3000), 5),
        );
    }

    #[test]
    fn fan_out_records_equal_the_events() {
        let t = transition(TransitionKind::Entered, 3000);
        let mut s = settings("u\"1", 1000, "u1@localhost");
        s.name = "Zoë \"<b>\"".into();
        s.quiet_hours = Some(QuietHours {
            start_min: 22 * 60,
            end_min: 7 * 60,
        });
        let enc = FanOutEncoder::new("matching", &t).unwrap();
        let deal = deal_info(&t);
        let (topic, r) = enc.encode(FanOut::Timeline { user: "u\"1" }).unwrap();
        let e = crate::matching::timeline_add(&t, &deal, "u\"1");
        let id = format!("{}:{}:add", e.entry, e.user);
        assert_eq!(topic, topics::TIMELINE);
        assert_eq!(
            r,
            crate::processors::envelope_owned("matching", id, e, t.at_ms)
                .into_record()
                .unwrap()
        );
        for (channel, address) in [
            (Channel::Email, "u1@localhost"),
            (Channel::Push, "http://p"),
        ] {
            let (topic, r) = enc
                .encode(FanOut::Notify {
                    user: "u\"1",
                    settings: &s,
                    channel,
                    address,
                })
                .unwrap();
            let n = crate::matching::request(&t, &deal, "u\"1", &s, channel, address);
            assert_eq!(topic, topics::NOTIFICATION_REQUESTS);
            assert_eq!(
                r,
                crate::processors::envelope_owned("matching", n.id.clone(), n, t.at_ms)
                    .into_record()
                    .unwrap()
            );
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
