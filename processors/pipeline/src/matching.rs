//! Matching: who hears about a deal.
//!
//! Inputs: users' alert settings and address status (compacted topics, read in full by every
//! instance, like Kafka Streams' global tables) and deal transitions (partitioned by product).
//! For a product **entering** "deal", every user whose settings name the category and whose
//! minimum drop is at most the deal's drop gets one timeline entry and one notification request
//! per channel they chose that has an address, except e-mail to an address flagged unreachable.
//! The users so notified are remembered per product; when the product **leaves** "deal", each
//! of them gets a timeline removal and the memory is cleared.
//!
//! Everything an input produces goes out in one transaction with the input's offset. A deal's
//! fan-out is streamed ([`Matcher::fan_out`]: borrowed [`FanOut`] items, the deal the same for
//! all, so the processor encodes it once); [`Matcher::on_transition`] returns the same outputs
//! as events (tests, the oracle). The state lives behind [`MatchingStore`] (the runtime's
//! state stores in the processor, [`MemStore`] in tests), keyed so that a deal's audience is one
//! ordered range scan: `(category, min_drop, user)`, stopping at the first `min_drop` above the
//! deal's drop. Memory is therefore the store's, bounded by its configuration, not by users.
//!
//! Invariants: notification ids depend only on (transition, user, channel); a user appears at
//! most once per deal (settings list a category once after normalisation); a removal is
//! emitted only for a user who got the add.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::events::{
    AddressStatus, AlertSettings, BasisPoints, Channel, DealInfo, DealTransition, NotificationKind,
    NotificationRequest, TimelineEvent, TimelineOp, TransitionKind,
};
use crate::ids::notification_id;

/// What matching emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// To `notification-requests`.
    Notify(NotificationRequest),
    /// To `timeline`.
    Timeline(TimelineEvent),
}

/// One output of a deal's fan-out ([`Matcher::fan_out`]), borrowed from the matcher. The deal
/// is the same for every output of a fan-out ([`deal_info`] of the transition).
#[derive(Debug, Clone, Copy)]
pub enum FanOut<'a> {
    /// The user's timeline entry (once per user, before the user's requests):
    /// [`timeline_add`].
    Timeline {
        /// The user.
        user: &'a str,
    },
    /// A notification request on one channel: [`request`].
    Notify {
        /// The user.
        user: &'a str,
        /// The user's settings (normalised).
        settings: &'a AlertSettings,
        /// The channel.
        channel: Channel,
        /// The address on that channel.
        address: &'a str,
    },
}

/// The deal that every output of a transition's fan-out carries.
pub fn deal_info(t: &DealTransition) -> DealInfo {
    DealInfo {
        transition: t.id.clone(),
        product: t.product.clone(),
        name: t.name.clone(),
        category: t.category.clone(),
        price: t.price,
        reference: t.reference,
        drop_bp: t.drop_bp,
        merchant: t.merchant.clone(),
    }
}

/// The timeline entry [`FanOut::Timeline`] stands for.
pub fn timeline_add(t: &DealTransition, deal: &DealInfo, user: &str) -> TimelineEvent {
    TimelineEvent {
        user: user.to_owned(),
        op: TimelineOp::Add,
        entry: t.id.clone(),
        product: t.product.clone(),
        deal: Some(deal.clone()),
        at_ms: t.at_ms,
    }
}

/// The notification request [`FanOut::Notify`] stands for.
pub fn request(
    t: &DealTransition,
    deal: &DealInfo,
    user: &str,
    s: &AlertSettings,
    channel: Channel,
    address: &str,
) -> NotificationRequest {
    NotificationRequest {
        id: notification_id(&t.id, user, channel),
        kind: NotificationKind::DealAlert,
        user: user.to_owned(),
        user_name: s.name.clone(),
        channel,
        address: address.to_owned(),
        time_zone: s.time_zone.clone(),
        quiet_hours: s.quiet_hours,
        deal: Some(deal.clone()),
        campaign: None,
        at_ms: t.at_ms,
    }
}

/// What [`Matcher::fan_out`] hands each output to (with the store, for a caller that emits
/// through it).
pub type Emit<'e, S> =
    dyn FnMut(&mut S, FanOut<'_>) -> Result<(), <S as MatchingStore>::Error> + 'e;

/// A user in a category's audience: the index entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    /// The user's minimum drop.
    pub min_drop_bp: BasisPoints,
    /// The user.
    pub user: String,
}

/// The state matching needs. Implementations must iterate [`MatchingStore::audience`] in
/// `(min_drop_bp, user)` order.
pub trait MatchingStore {
    /// A failing store.
    type Error;
    /// A user's settings (shared: a deal reads every user's, a cache may keep them decoded).
    fn settings(&mut self, user: &str) -> Result<Option<Arc<AlertSettings>>, Self::Error>;
    /// Stores (or with `None`, deletes) a user's settings.
    fn put_settings(
        &mut self,
        user: &str,
        settings: Option<AlertSettings>,
    ) -> Result<(), Self::Error>;
    /// Adds or removes one `(category, min_drop, user)` index entry.
    fn index(&mut self, category: &str, entry: &Audience, present: bool)
    -> Result<(), Self::Error>;
    /// Visits the next page of a category's audience with `min_drop_bp <= max_drop`, in
    /// order: at most `limit` entries after `after` (from the start with `None`). True if
    /// there may be more (the page was full).
    fn audience(
        &mut self,
        category: &str,
        max_drop: BasisPoints,
        after: Option<&Audience>,
        limit: usize,
        visit: &mut dyn FnMut(&Audience),
    ) -> Result<bool, Self::Error>;
    /// Whether an address is flagged unreachable.
    fn unreachable(&mut self, address: &str) -> Result<bool, Self::Error>;
    /// Sets or clears an address's flag.
    fn set_unreachable(&mut self, address: &str, flagged: bool) -> Result<(), Self::Error>;
    /// Remembers that `user` got the timeline entry `entry` for `product`.
    fn add_notified(&mut self, product: &str, user: &str, entry: &str) -> Result<(), Self::Error>;
    /// Takes (returns and forgets) up to `limit` of the users notified for `product`:
    /// `(user, entry)` pairs.
    fn take_notified(
        &mut self,
        product: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, Self::Error>;
}

/// Settings as matching uses them: categories deduplicated, channels deduplicated and ordered,
/// addresses trimmed (e-mail lowercased).
pub fn normalize(mut s: AlertSettings) -> AlertSettings {
    s.categories.sort();
    s.categories.dedup();
    s.channels.sort();
    s.channels.dedup();
    s.email = s
        .email
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty());
    s.webhook_url = s
        .webhook_url
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty());
    s.push_url = s
        .push_url
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty());
    s
}

/// The matching logic over a store.
#[derive(Debug)]
pub struct Matcher<S> {
    store: S,
}

impl<S: MatchingStore> Matcher<S> {
    /// Matching over `store`.
    pub fn new(store: S) -> Self {
        Matcher { store }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// A user's settings changed (`None`: the user was deleted: a tombstone). Emits nothing.
    pub fn on_settings(
        &mut self,
        user: &str,
        settings: Option<AlertSettings>,
    ) -> Result<(), S::Error> {
        if let Some(old) = self.store.settings(user)? {
            for c in &old.categories {
                let e = Audience {
                    min_drop_bp: old.min_drop_bp,
                    user: user.to_owned(),
                };
                self.store.index(c, &e, false)?;
            }
        }
        let settings = settings.map(normalize);
        if let Some(new) = &settings {
            for c in &new.categories {
                let e = Audience {
                    min_drop_bp: new.min_drop_bp,
                    user: user.to_owned(),
                };
                self.store.index(c, &e, true)?;
            }
        }
        self.store.put_settings(user, settings)
    }

    /// An address's status changed. Emits nothing.
    pub fn on_address_status(&mut self, s: &AddressStatus) -> Result<(), S::Error> {
        self.store
            .set_unreachable(&s.address.trim().to_ascii_lowercase(), s.unreachable)
    }

    /// A deal transition: the notifications and timeline changes it causes, all of them.
    pub fn on_transition(&mut self, t: &DealTransition) -> Result<Vec<Output>, S::Error> {
        match t.kind {
            TransitionKind::Entered => self.entered(t),
            TransitionKind::Left => Ok(self
                .removals(t, usize::MAX)?
                .0
                .into_iter()
                .map(Output::Timeline)
                .collect()),
        }
    }

    /// A product left "deal" (`t.kind` is [`TransitionKind::Left`]): timeline removals for
    /// up to `limit` of the users notified of it, who are forgotten; true if there may be
    /// more (call again).
    pub fn removals(
        &mut self,
        t: &DealTransition,
        limit: usize,
    ) -> Result<(Vec<TimelineEvent>, bool), S::Error> {
        debug_assert_eq!(t.kind, TransitionKind::Left);
        let taken = self.store.take_notified(&t.product, limit)?;
        let more = taken.len() >= limit;
        let out = taken
            .into_iter()
            .map(|(user, entry)| TimelineEvent {
                user,
                op: TimelineOp::Remove,
                entry,
                product: t.product.clone(),
                deal: None,
                at_ms: t.at_ms,
            })
            .collect();
        Ok((out, more))
    }

    fn entered(&mut self, t: &DealTransition) -> Result<Vec<Output>, S::Error> {
        let deal = deal_info(t);
        let mut out = Vec::new();
        self.fan_out(t, None, usize::MAX, &mut |_, o| {
            out.push(match o {
                FanOut::Timeline { user } => Output::Timeline(timeline_add(t, &deal, user)),
                FanOut::Notify {
                    user,
                    settings,
                    channel,
                    address,
                } => Output::Notify(request(t, &deal, user, settings, channel, address)),
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// The fan-out of a product entering "deal" (`t.kind` is [`TransitionKind::Entered`]),
    /// one page of it: the next at most `limit` users of the audience after `after`. Per
    /// interested user, in audience order, the timeline entry, then a request per channel
    /// that has an address (no e-mail to a flagged one); remembers each user as notified.
    /// `emit` gets each output as it is found, with the store (for a caller that emits
    /// through it); nothing is collected here beyond the page's user ids. Returns where to
    /// go on from when there may be more (the last user of a full page).
    pub fn fan_out(
        &mut self,
        t: &DealTransition,
        after: Option<&Audience>,
        limit: usize,
        emit: &mut Emit<'_, S>,
    ) -> Result<Option<Audience>, S::Error> {
        debug_assert_eq!(t.kind, TransitionKind::Entered);
        let mut page = Vec::new();
        let more = self
            .store
            .audience(&t.category, t.drop_bp, after, limit, &mut |a| {
                page.push(a.clone())
            })?;
        for Audience { user, .. } in &page {
            let Some(s) = self.store.settings(user)? else {
                continue; // index and settings are written together; defensive only
            };
            emit(&mut self.store, FanOut::Timeline { user })?;
            self.store.add_notified(&t.product, user, &t.id)?;
            for &channel in &s.channels {
                let address = match channel {
                    Channel::Email => match s.email.as_deref() {
                        Some(a) if !self.store.unreachable(a)? => Some(a),
                        _ => None,
                    },
                    Channel::Webhook => s.webhook_url.as_deref(),
                    Channel::Push => s.push_url.as_deref(),
                };
                let Some(address) = address else { continue };
                emit(
                    &mut self.store,
                    FanOut::Notify {
                        user,
                        settings: &s,
                        channel,
                        address,
                    },
                )?;
            }
        }
        Ok(if more { page.pop() } else { None })
    }
}

/// An in-memory [`MatchingStore`] (tests, benchmarks, the oracle's cross-checks).
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    settings: BTreeMap<String, Arc<AlertSettings>>,
    index: BTreeMap<(String, BasisPoints, String), ()>,
    unreachable: BTreeMap<String, ()>,
    notified: BTreeMap<(String, String), String>,
}

impl MatchingStore for MemStore {
    type Error = std::convert::Infallible;
    fn settings(&mut self, user: &str) -> Result<Option<Arc<AlertSettings>>, Self::Error> {
        Ok(self.settings.get(user).cloned())
    }
    fn put_settings(
        &mut self,
        user: &str,
        settings: Option<AlertSettings>,
    ) -> Result<(), Self::Error> {
        match settings {
            Some(s) => self.settings.insert(user.to_owned(), Arc::new(s)),
            None => self.settings.remove(user),
        };
        Ok(())
    }
    fn index(&mut self, category: &str, e: &Audience, present: bool) -> Result<(), Self::Error> {
        let k = (category.to_owned(), e.min_drop_bp, e.user.clone());
        if present {
            self.index.insert(k, ());
        } else {
            self.index.remove(&k);
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
    ) -> Result<bool, Self::Error> {
        use std::ops::Bound;
        let from = match after {
            Some(a) => Bound::Excluded((category.to_owned(), a.min_drop_bp, a.user.clone())),
            None => Bound::Included((category.to_owned(), 0, String::new())),
        };
        for (n, ((c, d, u), ())) in self.index.range((from, Bound::Unbounded)).enumerate() {
            if c != category || *d > max_drop {
                return Ok(false);
            }
            if n == limit {
                return Ok(true);
            }
            visit(&Audience {
                min_drop_bp: *d,
                user: u.clone(),
            });
        }
        Ok(false)
    }
    fn unreachable(&mut self, address: &str) -> Result<bool, Self::Error> {
        Ok(self.unreachable.contains_key(address))
    }
    fn set_unreachable(&mut self, address: &str, flagged: bool) -> Result<(), Self::Error> {
        if flagged {
            self.unreachable.insert(address.to_owned(), ());
        } else {
            self.unreachable.remove(address);
        }
        Ok(())
    }
    fn add_notified(&mut self, product: &str, user: &str, entry: &str) -> Result<(), Self::Error> {
        self.notified
            .insert((product.to_owned(), user.to_owned()), entry.to_owned());
        Ok(())
    }
    fn take_notified(
        &mut self,
        product: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, Self::Error> {
        let keys: Vec<_> = self
            .notified
            .range((product.to_owned(), String::new())..)
            .take_while(|((p, _), _)| p == product)
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect();
        Ok(keys
            .into_iter()
            .map(|k| {
                let entry = self.notified.remove(&k).expect("listed");
                (k.1, entry)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;

    fn settings(user: &str, cats: &[&str], min: BasisPoints, ch: &[Channel]) -> AlertSettings {
        AlertSettings {
            user: user.into(),
            name: user.to_uppercase(),
            categories: cats.iter().map(|c| c.to_string()).collect(),
            min_drop_bp: min,
            channels: ch.to_vec(),
            email: Some(format!("{user}@Example.COM ")),
            webhook_url: Some(format!("http://hooks/{user}")),
            push_url: None,
            time_zone: "UTC".into(),
            quiet_hours: None,
            at_ms: 0,
        }
    }

    fn transition(
        product: &str,
        cat: &str,
        kind: TransitionKind,
        ep: u32,
        drop: BasisPoints,
    ) -> DealTransition {
        DealTransition {
            id: format!("{product}:{ep}"),
            product: product.into(),
            episode: ep,
            kind,
            category: cat.into(),
            name: "thing".into(),
            price: 70,
            reference: 100,
            drop_bp: drop,
            merchant: "m1".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn fans_out_by_category_and_drop_and_removes() {
        let mut m = Matcher::new(MemStore::default());
        m.on_settings(
            "u1",
            Some(settings(
                "u1",
                &["books", "books"],
                1000,
                &[Channel::Email, Channel::Webhook, Channel::Email],
            )),
        )
        .unwrap();
        m.on_settings(
            "u2",
            Some(settings("u2", &["books"], 3000, &[Channel::Email])),
        )
        .unwrap();
        m.on_settings("u3", Some(settings("u3", &["games"], 0, &[Channel::Email])))
            .unwrap();
        m.on_settings("u4", Some(settings("u4", &["books"], 0, &[Channel::Push])))
            .unwrap(); // no push url
        let out = m
            .on_transition(&transition("p1", "books", TransitionKind::Entered, 1, 2500))
            .unwrap();
        let notes: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Notify(n) => Some((n.user.as_str(), n.channel, n.address.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            notes,
            vec![
                ("u1", Channel::Email, "u1@example.com"),
                ("u1", Channel::Webhook, "http://hooks/u1"),
            ]
        );
        let adds: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Timeline(t) => Some((t.user.as_str(), t.op)),
                _ => None,
            })
            .collect();
        // u4 is interested (timeline) though it has no deliverable channel; u2's floor is 30 %.
        assert_eq!(adds, vec![("u4", TimelineOp::Add), ("u1", TimelineOp::Add)]);
        let out = m
            .on_transition(&transition("p1", "books", TransitionKind::Left, 1, 0))
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(
            |o| matches!(o, Output::Timeline(t) if t.op == TimelineOp::Remove && t.entry == "p1:1")
        ));
        assert!(
            m.on_transition(&transition("p1", "books", TransitionKind::Left, 1, 0))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn flagged_addresses_get_no_mail_and_settings_changes_move_the_index() {
        let mut m = Matcher::new(MemStore::default());
        m.on_settings(
            "u1",
            Some(settings(
                "u1",
                &["books"],
                1000,
                &[Channel::Email, Channel::Webhook],
            )),
        )
        .unwrap();
        m.on_address_status(&AddressStatus {
            address: "U1@example.com".into(),
            unreachable: true,
            reason: "5.1.1".into(),
            mail_id: None,
            at_ms: 0,
        })
        .unwrap();
        let out = m
            .on_transition(&transition("p1", "books", TransitionKind::Entered, 1, 2500))
            .unwrap();
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Notify(n) if n.channel == Channel::Email))
        );
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Notify(n) if n.channel == Channel::Webhook))
        );
        // Move u1 to games: books no longer reaches them; a tombstone removes them entirely.
        m.on_settings(
            "u1",
            Some(settings("u1", &["games"], 1000, &[Channel::Webhook])),
        )
        .unwrap();
        assert!(
            m.on_transition(&transition("p2", "books", TransitionKind::Entered, 1, 9000))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            m.on_transition(&transition("p3", "games", TransitionKind::Entered, 1, 9000))
                .unwrap()
                .len(),
            2
        );
        m.on_settings("u1", None).unwrap();
        assert!(
            m.on_transition(&transition("p4", "games", TransitionKind::Entered, 1, 9000))
                .unwrap()
                .is_empty()
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Settings(u8, Option<(Vec<u8>, u8, Vec<u8>)>),
        Flag(u8, bool),
        Enter(u8, u8, u8),
        Leave(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u8..8,
                proptest::option::of((
                    proptest::collection::vec(0u8..3, 0..3),
                    0u8..5,
                    proptest::collection::vec(0u8..3, 0..4)
                ))
            )
                .prop_map(|(u, s)| Op::Settings(u, s)),
            (0u8..8, any::<bool>()).prop_map(|(u, f)| Op::Flag(u, f)),
            (0u8..4, 0u8..3, 0u8..5).prop_map(|(p, c, d)| Op::Enter(p, c, d)),
            (0u8..4).prop_map(Op::Leave),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Against a model that scans every user for every deal (no index).
        #[test]
        fn matches_a_scan_everything_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut m = Matcher::new(MemStore::default());
            let mut users: BTreeMap<String, AlertSettings> = BTreeMap::new();
            let mut flagged: BTreeSet<String> = BTreeSet::new();
            let mut notified: HashMap<String, (u32, BTreeSet<String>)> = HashMap::new();
            let mut episodes: HashMap<String, u32> = HashMap::new();
            let mut emitted_ids = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Settings(u, s) => {
                        let user = format!("u{u}");
                        let s = s.map(|(cats, min, ch)| {
                            let cats: Vec<String> = cats.iter().map(|c| format!("c{c}")).collect();
                            let cats: Vec<&str> = cats.iter().map(String::as_str).collect();
                            let ch: Vec<Channel> = ch.iter().map(|&c| Channel::ALL[c as usize % 3]).collect();
                            settings(&user, &cats, u32::from(min) * 1000, &ch)
                        });
                        match &s { Some(s) => { users.insert(user.clone(), s.clone()); } None => { users.remove(&user); } }
                        m.on_settings(&user, s).unwrap();
                    }
                    Op::Flag(u, f) => {
                        let a = format!("u{u}@example.com");
                        if f { flagged.insert(a.clone()); } else { flagged.remove(&a); }
                        m.on_address_status(&AddressStatus { address: a, unreachable: f, reason: String::new(), mail_id: None, at_ms: 0 }).unwrap();
                    }
                    Op::Enter(p, c, d) => {
                        let product = format!("p{p}");
                        if notified.contains_key(&product) { continue; } // deals alternates per product
                        let ep = episodes.entry(product.clone()).or_default();
                        *ep += 1;
                        let drop = u32::from(d) * 1000;
                        let cat = format!("c{c}");
                        let out = m.on_transition(&transition(&product, &cat, TransitionKind::Entered, *ep, drop)).unwrap();
                        let mut want_adds = BTreeSet::new();
                        let mut want_notes = BTreeSet::new();
                        for (user, s) in &users {
                            if s.categories.contains(&cat) && s.min_drop_bp <= drop {
                                want_adds.insert(user.clone());
                                let mut chans: Vec<Channel> = s.channels.clone();
                                chans.sort(); chans.dedup();
                                for ch in chans {
                                    let ok = match ch {
                                        Channel::Email => !flagged.contains(&format!("{user}@example.com")),
                                        Channel::Webhook => true,
                                        Channel::Push => false,
                                    };
                                    if ok { want_notes.insert((user.clone(), ch)); }
                                }
                            }
                        }
                        let got_adds: BTreeSet<String> = out.iter().filter_map(|o| match o { Output::Timeline(t) => Some(t.user.clone()), _ => None }).collect();
                        let got_notes: BTreeSet<(String, Channel)> = out.iter().filter_map(|o| match o { Output::Notify(n) => Some((n.user.clone(), n.channel)), _ => None }).collect();
                        prop_assert_eq!(&got_adds, &want_adds);
                        prop_assert_eq!(&got_notes, &want_notes);
                        prop_assert_eq!(out.len(), want_adds.len() + want_notes.len(), "no duplicates");
                        for o in &out {
                            if let Output::Notify(n) = o {
                                prop_assert!(emitted_ids.insert(n.id.clone()), "ids unique across deals");
                            }
                        }
                        notified.insert(product, (*ep, want_adds));
                    }
                    Op::Leave(p) => {
                        let product = format!("p{p}");
                        let out = m.on_transition(&transition(&product, "c0", TransitionKind::Left, 0, 0)).unwrap();
                        let (ep, want) = notified.remove(&product).unwrap_or_default();
                        let got: BTreeSet<String> = out.iter().map(|o| match o {
                            Output::Timeline(t) => { assert_eq!(t.entry, format!("{product}:{ep}")); t.user.clone() }
                            Output::Notify(_) => panic!("no notifications on leave"),
                        }).collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }
}
