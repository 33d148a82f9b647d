//! The deal heuristic: a pure state machine over one product's price history.
//!
//! A product's price is its **best offer** across merchants (BestPrice compares merchants).
//! Each price update changes one merchant's offer; after applying it, the product's best price
//! is compared with its **reference price**, the lower median of the last
//! [`DealParams::window`] best prices seen before this update:
//!
//! - not a deal → **enters** when the history holds at least [`DealParams::min_history`]
//!   points and `best ≤ reference × (1 − enter_bp)`; the reference is then frozen for the
//!   deal's lifetime (a deal's own low prices must not drag its reference down);
//! - a deal → **leaves** when `best > frozen_reference × (1 − exit_bp)` (the drop shrank
//!   below the exit threshold), when the product has no offer left, or when the deal is older
//!   than [`DealParams::max_deal_ms`] in event time: at the product's next update
//!   ([`ProductState::apply`]), or without one at [`ProductState::expires_at_ms`]
//!   ([`ProductState::expire`], the deals processor's stream-time timer).
//! - a deal that **expired** makes its price the regular one: the history restarts from the
//!   current best price alone, so the old pre-deal prices no longer make the same low price
//!   a deal again (a new deal needs [`DealParams::min_history`] new points and a drop from
//!   the prices seen since). Expiry wins over the exit threshold: an update past
//!   `max_deal_ms` that also raised the price ends the deal as expired, and the history
//!   restarts from that higher price (the regular one as well).
//!
//! `exit_bp < enter_bp` is the hysteresis: a price wobbling around the entry threshold does
//! not flap in and out. Transitions are emitted only on a change of state; both carry the
//! category, the price, the reference and the drop. All arithmetic is on integers, so the
//! oracle in the tests (and anyone re-deriving a decision) gets the same answer.
//!
//! An update older (event time) than the last one applied for its merchant is stale (two feed
//! writers overlapping) and ignored (counted): a stale low price must not overwrite a newer
//! offer and enter a deal. A withdrawal's time is kept too (a tombstone), so a stale offer
//! does not come back after it.
//!
//! State size is bounded: at most [`DealParams::max_offers`] merchants per product (offers from
//! further merchants are ignored and counted), [`DealParams::window`] history points, and the
//! merchants' latest update times: one per offer plus at most `max_offers` tombstones.
//!
//! A state is stored in a compact binary form ([`ProductState::encode`]), read and rewritten on
//! every update: JSON took about a seventh of the processor's time (parsing, number and string
//! formatting). [`ProductState::decode`] also reads the JSON that earlier versions stored.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::events::{BasisPoints, Cents, DealTransition, PriceUpdate, TransitionKind};
use crate::ids::transition_id;

/// The heuristic's knobs (config `[deals]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DealParams {
    /// Trailing history length for the median (points).
    pub window: usize,
    /// Points needed before a product can enter "deal".
    pub min_history: usize,
    /// Drop below the reference needed to enter, basis points.
    pub enter_bp: BasisPoints,
    /// Drop below the frozen reference under which a deal ends, basis points (< `enter_bp`).
    pub exit_bp: BasisPoints,
    /// A deal ends after this long (event time), ms.
    pub max_deal_ms: i64,
    /// Merchants kept per product.
    pub max_offers: usize,
}

impl Default for DealParams {
    fn default() -> Self {
        DealParams {
            window: 16,
            min_history: 4,
            enter_bp: 2_000,
            exit_bp: 1_000,
            max_deal_ms: 7 * 24 * 3600 * 1000,
            max_offers: 64,
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    /// A value out of its range.
    #[error("deals: {0}")]
    Invalid(&'static str),
}

impl DealParams {
    /// Checks the ranges and the hysteresis.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let bad = |m| Err(ParamsError::Invalid(m));
        if !(2..=256).contains(&self.window) {
            return bad("window must be 2..=256");
        }
        if self.min_history == 0 || self.min_history > self.window {
            return bad("min_history must be 1..=window");
        }
        if self.enter_bp == 0 || self.enter_bp >= 10_000 {
            return bad("enter_bp must be 1..10000");
        }
        if self.exit_bp >= self.enter_bp {
            return bad("exit_bp must be below enter_bp (hysteresis)");
        }
        if self.max_deal_ms <= 0 {
            return bad("max_deal_ms must be positive");
        }
        if !(1..=4096).contains(&self.max_offers) {
            return bad("max_offers must be 1..=4096");
        }
        Ok(())
    }
}

/// A deal in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDeal {
    /// Episode number (1-based).
    pub episode: u32,
    /// The frozen reference price.
    pub reference: Cents,
    /// Event time it started.
    pub since_ms: i64,
}

/// One product's state (the value in the deals processor's `products` store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductState {
    /// Current offers by merchant.
    pub offers: BTreeMap<String, Cents>,
    /// The last `window` best prices, oldest first.
    pub history: VecDeque<Cents>,
    /// The current deal, if any.
    pub deal: Option<ActiveDeal>,
    /// Deals so far (the next one is `episodes + 1`).
    pub episodes: u32,
    /// Offers ignored because the product had `max_offers` merchants already.
    pub ignored_offers: u64,
    /// Event time of each merchant's latest update applied (an offer, or a withdrawal: then
    /// the merchant has no offer, and the entry is a tombstone). An update older than its
    /// merchant's entry is stale (two feed writers overlapping) and ignored. At most
    /// `max_offers` tombstones are kept (the oldest go first). Empty for a state stored
    /// before it existed: nothing is stale until each merchant's next update.
    #[serde(default)]
    pub offer_at: BTreeMap<String, i64>,
    /// Updates ignored as stale.
    #[serde(default)]
    pub stale_updates: u64,
}

/// First byte of the binary form without `offer_at` and `stale_updates` (still read).
const BINARY_V1: u8 = 1;
/// First byte of the binary form (JSON starts with `{`).
const BINARY_V2: u8 = 2;

/// Why a stored state does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateDecodeError {
    /// The binary form is cut short or malformed.
    #[error("product state: {0}")]
    Binary(&'static str),
    /// The JSON form (earlier versions) does not parse.
    #[error("product state (JSON): {0}")]
    Json(String),
}

/// Reads the binary form, bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateDecodeError> {
        if self.0.len() < n {
            return Err(StateDecodeError::Binary("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StateDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, StateDecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, StateDecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, StateDecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A map written by [`put_merchants`] (values as `u64`).
    fn merchants(&mut self) -> Result<BTreeMap<String, u64>, StateDecodeError> {
        let mut map = BTreeMap::new();
        for _ in 0..self.u16()? {
            let len = usize::from(self.u16()?);
            let name = std::str::from_utf8(self.take(len)?)
                .map_err(|_| StateDecodeError::Binary("merchant is not UTF-8"))?;
            map.insert(name.to_owned(), self.u64()?);
        }
        Ok(map)
    }
}

/// Appends a merchant-keyed map of 8-byte values (the offers' prices, their update times): its
/// count (`u16`), then each entry's name length (`u16`), name and value (little-endian).
/// Entries past `u16::MAX`, or with a longer name, cannot occur (see
/// [`ProductState::encode`]) and are left out rather than written wrong.
fn put_merchants<'m>(
    b: &mut Vec<u8>,
    entries: impl Iterator<Item = (&'m String, [u8; 8])> + Clone,
) {
    let entries = entries
        .filter(|(m, _)| m.len() <= u16::MAX as usize)
        .take(u16::MAX as usize);
    b.extend_from_slice(&(entries.clone().count() as u16).to_le_bytes());
    for (m, v) in entries {
        b.extend_from_slice(&(m.len() as u16).to_le_bytes());
        b.extend_from_slice(m.as_bytes());
        b.extend_from_slice(&v);
    }
}

/// The lower median of `values` (`None` when empty).
pub fn lower_median(values: impl IntoIterator<Item = Cents>) -> Option<Cents> {
    let mut v: Vec<Cents> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

/// `(reference - price)` as basis points of `reference` (0 when not below it).
pub fn drop_bp(reference: Cents, price: Cents) -> BasisPoints {
    if reference == 0 || price >= reference {
        return 0;
    }
    (u128::from(reference - price) * 10_000 / u128::from(reference)) as BasisPoints
}

/// `price ≤ reference × (1 − bp)`, exactly.
fn at_or_below(price: Cents, reference: Cents, bp: BasisPoints) -> bool {
    u128::from(price) * 10_000 <= u128::from(reference) * u128::from(10_000 - bp)
}

impl ProductState {
    /// The binary form: `[2]`, episodes (u32), ignored offers (u64), the deal (`0`, or `1`,
    /// episode u32, reference u64, since i64), the history (count u16, u64 each), the offers
    /// (count u16, then name length u16, name, price u64 each), stale updates (u64), the
    /// merchants' latest update times (count u16, then name length u16, name, at i64 each);
    /// little-endian. `[1]` (read, no longer written) ends after the offers. Counts and names
    /// beyond `u16::MAX` cannot occur (`max_offers` ≤ 4096, so at most 8192 update times;
    /// `window` ≤ 256) and are refused by [`ProductState::decode`] if they did.
    pub fn encode(&self) -> Vec<u8> {
        let names: usize = self.offers.keys().map(|m| 2 + m.len() + 8).sum::<usize>()
            + self.offer_at.keys().map(|m| 2 + m.len() + 8).sum::<usize>();
        let mut b =
            Vec::with_capacity(1 + 4 + 8 + 21 + 2 + 8 * self.history.len() + 2 + 8 + 2 + names);
        b.push(BINARY_V2);
        b.extend_from_slice(&self.episodes.to_le_bytes());
        b.extend_from_slice(&self.ignored_offers.to_le_bytes());
        match &self.deal {
            None => b.push(0),
            Some(d) => {
                b.push(1);
                b.extend_from_slice(&d.episode.to_le_bytes());
                b.extend_from_slice(&d.reference.to_le_bytes());
                b.extend_from_slice(&d.since_ms.to_le_bytes());
            }
        }
        b.extend_from_slice(&(self.history.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for h in self.history.iter().take(u16::MAX as usize) {
            b.extend_from_slice(&h.to_le_bytes());
        }
        put_merchants(
            &mut b,
            self.offers.iter().map(|(m, p)| (m, p.to_le_bytes())),
        );
        b.extend_from_slice(&self.stale_updates.to_le_bytes());
        put_merchants(
            &mut b,
            self.offer_at.iter().map(|(m, at)| (m, at.to_le_bytes())),
        );
        b
    }

    /// A stored state: the binary form, or the JSON earlier versions wrote.
    pub fn decode(v: &[u8]) -> Result<ProductState, StateDecodeError> {
        let v2 = match v.first() {
            Some(&BINARY_V1) => false,
            Some(&BINARY_V2) => true,
            Some(b'{') => {
                return serde_json::from_slice(v)
                    .map_err(|e| StateDecodeError::Json(e.to_string()));
            }
            _ => return Err(StateDecodeError::Binary("unknown format")),
        };
        let mut r = Reader(&v[1..]);
        let episodes = r.u32()?;
        let ignored_offers = r.u64()?;
        let deal = match r.u8()? {
            0 => None,
            1 => Some(ActiveDeal {
                episode: r.u32()?,
                reference: r.u64()?,
                since_ms: r.u64()? as i64,
            }),
            _ => return Err(StateDecodeError::Binary("bad deal tag")),
        };
        let n = usize::from(r.u16()?);
        let mut history = VecDeque::with_capacity(n.min(r.0.len() / 8));
        for _ in 0..n {
            history.push_back(r.u64()?);
        }
        let offers = r.merchants()?;
        let (mut stale_updates, mut offer_at) = (0, BTreeMap::new());
        if v2 {
            stale_updates = r.u64()?;
            offer_at = r
                .merchants()?
                .into_iter()
                .map(|(m, at)| (m, at as i64))
                .collect();
        }
        if !r.0.is_empty() {
            return Err(StateDecodeError::Binary("trailing bytes"));
        }
        Ok(ProductState {
            offers,
            history,
            deal,
            episodes,
            ignored_offers,
            offer_at,
            stale_updates,
        })
    }

    /// The best offer: lowest price, ties to the smallest merchant id.
    pub fn best(&self) -> Option<(&str, Cents)> {
        self.offers
            .iter()
            .min_by_key(|(m, p)| (**p, m.as_str()))
            .map(|(m, p)| (m.as_str(), *p))
    }

    /// When the current deal (if any) expires: the first event time more than
    /// [`DealParams::max_deal_ms`] after it started.
    pub fn expires_at_ms(&self, p: &DealParams) -> Option<i64> {
        self.deal
            .as_ref()
            .map(|d| d.since_ms.saturating_add(p.max_deal_ms).saturating_add(1))
    }

    /// Ends the current deal if it is older than [`DealParams::max_deal_ms`] at event time
    /// `now_ms`, without a price update (no update came since; the deals processor calls this
    /// from a stream-time timer at [`ProductState::expires_at_ms`]). The `Left` names `product`,
    /// `category` and `name` (the state does not keep them), at the current best price, and
    /// the history restarts from that price, as when [`ProductState::apply`] expires a deal.
    pub fn expire(
        &mut self,
        product: &str,
        category: &str,
        name: &str,
        now_ms: i64,
        p: &DealParams,
    ) -> Option<DealTransition> {
        let deal = self.deal.as_ref()?;
        if now_ms.saturating_sub(deal.since_ms) <= p.max_deal_ms {
            return None;
        }
        let deal = self.deal.take().expect("checked above");
        let (merchant, best) = match self.best() {
            Some((m, b)) => (m.to_owned(), b),
            // Not reached (a deal ends when its last offer goes), but harmless.
            None => (String::new(), deal.reference),
        };
        self.history.clear();
        self.history.push_back(best);
        let at = Named {
            product,
            category,
            name,
            at_ms: now_ms,
        };
        Some(at.transition(TransitionKind::Left, &deal, best, merchant))
    }

    /// Applies one price update; returns the transition, if the state changed.
    pub fn apply(&mut self, u: &PriceUpdate, p: &DealParams) -> Option<DealTransition> {
        if self
            .offer_at
            .get(&u.merchant)
            .is_some_and(|&at| u.at_ms < at)
        {
            // Older than what this merchant already said (see `offer_at`): nothing changes.
            self.stale_updates += 1;
            return None;
        }
        match u.price {
            Some(price) => {
                if !self.offers.contains_key(&u.merchant) && self.offers.len() >= p.max_offers {
                    self.ignored_offers += 1;
                    return None;
                }
                self.offers.insert(u.merchant.clone(), price);
            }
            None => {
                self.offers.remove(&u.merchant);
            }
        }
        self.offer_at.insert(u.merchant.clone(), u.at_ms);
        if u.price.is_none() && self.offer_at.len() > self.offers.len() + p.max_offers {
            // Too many tombstones: the oldest goes (a stale update of that merchant is then
            // taken as new, as before tombstones were kept).
            let oldest = self
                .offer_at
                .iter()
                .filter(|(m, _)| !self.offers.contains_key(*m))
                .min_by_key(|(m, at)| (**at, m.as_str()))
                .map(|(m, _)| m.clone());
            if let Some(m) = oldest {
                self.offer_at.remove(&m);
            }
        }
        let Some((merchant, best)) = self.best().map(|(m, b)| (m.to_owned(), b)) else {
            // No offer left: a deal ends (at its last known reference), the history stays.
            let deal = self.deal.take()?;
            return Some(Named::of(u).transition(
                TransitionKind::Left,
                &deal,
                deal.reference,
                String::new(),
            ));
        };
        let reference = lower_median(self.history.iter().copied());
        let mut expired = false;
        let out = match &self.deal {
            None => match reference {
                Some(r)
                    if self.history.len() >= p.min_history && at_or_below(best, r, p.enter_bp) =>
                {
                    self.episodes += 1;
                    let deal = ActiveDeal {
                        episode: self.episodes,
                        reference: r,
                        since_ms: u.at_ms,
                    };
                    let t = Named::of(u).transition(TransitionKind::Entered, &deal, best, merchant);
                    self.deal = Some(deal);
                    Some(t)
                }
                _ => None,
            },
            Some(deal) => {
                expired = u.at_ms.saturating_sub(deal.since_ms) > p.max_deal_ms;
                if expired || !at_or_below(best, deal.reference, p.exit_bp) {
                    let deal = self.deal.take().expect("matched Some");
                    Some(Named::of(u).transition(TransitionKind::Left, &deal, best, merchant))
                } else {
                    None
                }
            }
        };
        if expired {
            // The low price has lasted: it is the regular price now (see the module docs).
            self.history.clear();
        }
        if self.history.len() == p.window {
            self.history.pop_front();
        }
        self.history.push_back(best);
        out
    }
}

/// What a transition names besides the deal: the product, its category and name, and the
/// event time.
struct Named<'a> {
    product: &'a str,
    category: &'a str,
    name: &'a str,
    at_ms: i64,
}

impl<'a> Named<'a> {
    fn of(u: &'a PriceUpdate) -> Named<'a> {
        Named {
            product: &u.product,
            category: &u.category,
            name: &u.name,
            at_ms: u.at_ms,
        }
    }

    fn transition(
        &self,
        kind: TransitionKind,
        deal: &ActiveDeal,
        price: Cents,
        merchant: String,
    ) -> DealTransition {
        DealTransition {
            id: transition_id(self.product, deal.episode),
            product: self.product.to_owned(),
            episode: deal.episode,
            kind,
            category: self.category.to_owned(),
            name: self.name.to_owned(),
            price,
            reference: deal.reference,
            drop_bp: drop_bp(deal.reference, price),
            merchant,
            at_ms: self.at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_state() -> impl Strategy<Value = ProductState> {
        (
            proptest::collection::btree_map("[a-z0-9é]{0,12}", any::<u64>(), 0..20),
            proptest::collection::vec_deque(any::<u64>(), 0..20),
            proptest::option::of((any::<u32>(), any::<u64>(), any::<i64>())),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::btree_map("[a-z0-9é]{0,12}", any::<i64>(), 0..20),
            any::<u64>(),
        )
            .prop_map(
                |(offers, history, deal, episodes, ignored_offers, offer_at, stale_updates)| {
                    ProductState {
                        offers,
                        history,
                        deal: deal.map(|(episode, reference, since_ms)| ActiveDeal {
                            episode,
                            reference,
                            since_ms,
                        }),
                        episodes,
                        ignored_offers,
                        offer_at,
                        stale_updates,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn binary_state_round_trips_and_json_still_reads(s in any_state()) {
            let b = s.encode();
            prop_assert_eq!(ProductState::decode(&b).unwrap(), s.clone());
            let json = serde_json::to_vec(&s).unwrap();
            prop_assert_eq!(ProductState::decode(&json).unwrap(), s.clone());
            // Every cut of the binary form is refused, never a panic or a wrong state.
            for cut in 0..b.len() {
                prop_assert!(ProductState::decode(&b[..cut]).is_err());
            }
        }
    }

    #[test]
    fn malformed_states_are_refused() {
        let mut b = ProductState::default().encode();
        b.push(0);
        assert_eq!(
            ProductState::decode(&b),
            Err(StateDecodeError::Binary("trailing bytes"))
        );
        assert!(ProductState::decode(b"").is_err());
        assert!(ProductState::decode(b"\x07").is_err());
        assert!(matches!(
            ProductState::decode(b"{\"offers\":1}"),
            Err(StateDecodeError::Json(_))
        ));
        // A count larger than the bytes that follow: refused without allocating for it.
        let mut b = vec![BINARY_V1];
        b.extend_from_slice(&[0; 12]);
        b.push(0);
        b.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            ProductState::decode(&b),
            Err(StateDecodeError::Binary("cut short"))
        );
    }

    fn upd(merchant: &str, price: Option<Cents>, at_ms: i64) -> PriceUpdate {
        PriceUpdate {
            product: "p1".into(),
            merchant: merchant.into(),
            category: "books".into(),
            name: "Book".into(),
            price,
            import: None,
            at_ms,
        }
    }

    fn run(
        s: &mut ProductState,
        p: &DealParams,
        prices: &[Cents],
    ) -> Vec<(TransitionKind, Cents, BasisPoints)> {
        // Event time goes on from the last update (earlier ones would be stale).
        let base = s.offer_at.values().max().map_or(0, |at| at + 1);
        prices
            .iter()
            .enumerate()
            .filter_map(|(i, &c)| s.apply(&upd("m1", Some(c), base + i as i64), p))
            .map(|t| (t.kind, t.price, t.drop_bp))
            .collect()
    }

    #[test]
    fn enters_below_median_and_leaves_with_hysteresis() {
        let p = DealParams::default();
        let mut s = ProductState::default();
        // 4 points of history at 1000, then 790 (21 % off) enters.
        let t = run(&mut s, &p, &[1000, 1000, 1000, 1000, 790]);
        assert_eq!(t, vec![(TransitionKind::Entered, 790, 2100)]);
        // 850 is 15 % off: between exit (10 %) and entry (20 %): stays a deal, no event.
        assert!(run(&mut s, &p, &[850, 800, 880]).is_empty());
        // 910 is 9 % off: leaves.
        let t = run(&mut s, &p, &[910]);
        assert_eq!(t, vec![(TransitionKind::Left, 910, 900)]);
        assert_eq!(s.episodes, 1);
        assert!(s.deal.is_none());
    }

    #[test]
    fn needs_history_and_exact_threshold() {
        let p = DealParams::default();
        let mut s = ProductState::default();
        assert!(
            run(&mut s, &p, &[1000, 1000, 1000, 500]).is_empty(),
            "3 points of history only"
        );
        let mut s = ProductState::default();
        // Exactly 20 % enters (≤), 20 % minus a cent does not.
        assert_eq!(run(&mut s, &p, &[1000, 1000, 1000, 1000, 800]).len(), 1);
        let mut s = ProductState::default();
        assert!(run(&mut s, &p, &[1000, 1000, 1000, 1000, 801]).is_empty());
    }

    #[test]
    fn best_offer_across_merchants_and_withdrawal() {
        let p = DealParams::default();
        let mut s = ProductState::default();
        for i in 0..4 {
            assert!(s.apply(&upd("m2", Some(1000), i), &p).is_none());
        }
        let t = s.apply(&upd("m1", Some(700), 10), &p).expect("enters");
        assert_eq!((t.merchant.as_str(), t.price), ("m1", 700));
        // m1 withdraws: best is m2's 1000 again: leaves.
        let t = s.apply(&upd("m1", None, 11), &p).expect("leaves");
        assert_eq!(
            (t.kind, t.merchant.as_str(), t.price),
            (TransitionKind::Left, "m2", 1000)
        );
        // All withdrawn while in a deal: leaves with the reference as price.
        s.apply(&upd("m1", Some(100), 12), &p)
            .expect("enters again");
        assert!(
            s.apply(&upd("m2", None, 13), &p).is_none(),
            "m1's 100 is still a deal"
        );
        let t = s
            .apply(&upd("m1", None, 14), &p)
            .expect("no offers: leaves");
        assert_eq!((t.kind, t.episode, t.drop_bp), (TransitionKind::Left, 2, 0));
    }

    #[test]
    fn deals_expire_in_event_time() {
        let p = DealParams {
            max_deal_ms: 100,
            ..DealParams::default()
        };
        let mut s = ProductState::default();
        for i in 0..4 {
            s.apply(&upd("m1", Some(1000), i), &p);
        }
        assert!(s.apply(&upd("m1", Some(500), 10), &p).is_some());
        assert!(s.apply(&upd("m1", Some(500), 110), &p).is_none());
        let t = s.apply(&upd("m1", Some(500), 111), &p).expect("expired");
        assert_eq!((t.kind, t.drop_bp), (TransitionKind::Left, 5000));
        // The price that stayed low is the regular price now: the same price again is no
        // new deal (the old 1000s no longer count).
        assert_eq!(s.apply(&upd("m1", Some(500), 112), &p), None);
        assert_eq!(s.apply(&upd("m1", Some(500), 113), &p), None);
        assert_eq!(s.history, VecDeque::from([500, 500, 500]));
        // A real drop from the new regular price is a new deal.
        for at in 114..120 {
            s.apply(&upd("m1", Some(500), at), &p);
        }
        let t = s.apply(&upd("m1", Some(390), 120), &p).expect("enters");
        assert_eq!(
            (t.kind, t.episode, t.reference),
            (TransitionKind::Entered, 2, 500)
        );
    }

    #[test]
    fn deals_expire_without_an_update() {
        let p = DealParams {
            max_deal_ms: 100,
            ..DealParams::default()
        };
        let mut s = ProductState::default();
        for i in 0..4 {
            s.apply(&upd("m1", Some(1000), i), &p);
        }
        assert_eq!(s.expires_at_ms(&p), None);
        s.apply(&upd("m1", Some(500), 10), &p).expect("enters");
        assert_eq!(s.expires_at_ms(&p), Some(111));
        assert_eq!(s.expire("p1", "books", "Book", 110, &p), None, "not yet");
        let t = s.expire("p1", "books", "Book", 111, &p).expect("expired");
        assert_eq!(
            (
                t.kind,
                t.episode,
                t.price,
                t.drop_bp,
                t.at_ms,
                t.id.as_str()
            ),
            (TransitionKind::Left, 1, 500, 5000, 111, "p1:1")
        );
        assert_eq!(s.expire("p1", "books", "Book", 500, &p), None, "no deal");
        // As after an expiry at an update: the low price is the regular price now.
        assert_eq!(s.apply(&upd("m1", Some(500), 112), &p), None);
        assert_eq!(s.expires_at_ms(&p), None);
    }

    /// An update older than its merchant's last one (an offer or a withdrawal) changes
    /// nothing; one at the same time or later applies; tombstones are bounded.
    #[test]
    fn stale_updates_are_ignored() {
        let p = DealParams::default();
        let mut s = ProductState::default();
        for i in 0..4 {
            s.apply(&upd("m1", Some(1000), 10 + i), &p);
        }
        // A low price from an earlier feed run arriving late: no deal, the offer stays.
        assert_eq!(s.apply(&upd("m1", Some(100), 5), &p), None);
        assert_eq!((s.best(), s.stale_updates), (Some(("m1", 1000)), 1));
        assert_eq!(s.history.len(), 4);
        // m1 withdraws at 20; its older offer does not come back.
        s.apply(&upd("m2", Some(1000), 20), &p);
        s.apply(&upd("m1", None, 20), &p);
        assert_eq!(s.apply(&upd("m1", Some(100), 19), &p), None);
        assert_eq!((s.best(), s.stale_updates), (Some(("m2", 1000)), 2));
        // The same time applies (updates of one instant in their order).
        let t = s.apply(&upd("m1", Some(700), 20), &p).expect("enters");
        assert_eq!((t.kind, t.price), (TransitionKind::Entered, 700));
        // At most max_offers tombstones: the oldest go first.
        let p = DealParams {
            max_offers: 2,
            ..DealParams::default()
        };
        let mut s = ProductState::default();
        for (i, m) in ["a", "b", "c", "d"].iter().enumerate() {
            s.apply(&upd(m, None, i as i64), &p);
        }
        assert_eq!(
            s.offer_at.keys().map(String::as_str).collect::<Vec<_>>(),
            ["c", "d"]
        );
    }

    /// A state stored in the first binary form (no update times) still reads.
    #[test]
    fn the_first_binary_form_still_reads() {
        let mut s = ProductState::default();
        s.apply(&upd("m1", Some(1000), 1), &DealParams::default());
        s.apply(&upd("m2", Some(900), 2), &DealParams::default());
        let v2 = s.encode();
        let tail: usize = 8 + 2 + s.offer_at.keys().map(|m| 2 + m.len() + 8).sum::<usize>();
        let mut v1 = v2[..v2.len() - tail].to_vec();
        v1[0] = BINARY_V1;
        let old = ProductState::decode(&v1).unwrap();
        assert_eq!(
            old,
            ProductState {
                offer_at: BTreeMap::new(),
                stale_updates: 0,
                ..s
            }
        );
    }

    #[test]
    fn offers_are_bounded() {
        let p = DealParams {
            max_offers: 2,
            ..DealParams::default()
        };
        let mut s = ProductState::default();
        s.apply(&upd("m1", Some(10), 0), &p);
        s.apply(&upd("m2", Some(10), 0), &p);
        s.apply(&upd("m3", Some(1), 0), &p);
        assert_eq!(s.offers.len(), 2);
        assert_eq!(s.ignored_offers, 1);
        assert_eq!(s.best(), Some(("m1", 10)));
    }

    #[test]
    fn params_are_validated() {
        assert!(DealParams::default().validate().is_ok());
        let p = DealParams {
            exit_bp: 2_000,
            ..DealParams::default()
        };
        assert!(p.validate().is_err());
    }

    /// The model: recompute everything from the full list of best prices, with no incremental
    /// state but the deal flag.
    fn model(
        p: &DealParams,
        updates: &[(u8, Option<Cents>, i64)],
    ) -> Vec<(TransitionKind, u32, Cents, Cents)> {
        let mut offers: BTreeMap<String, Cents> = BTreeMap::new();
        let mut bests: Vec<Cents> = Vec::new();
        let mut deal: Option<(u32, Cents, i64)> = None;
        let mut episodes = 0;
        let mut out = Vec::new();
        for &(m, price, at) in updates {
            let m = format!("m{m}");
            match price {
                Some(c) => {
                    offers.insert(m, c);
                }
                None => {
                    offers.remove(&m);
                }
            }
            let best = offers.iter().map(|(m, c)| (*c, m.clone())).min();
            let Some((best, _)) = best else {
                if let Some((ep, r, _)) = deal.take() {
                    out.push((TransitionKind::Left, ep, r, r));
                }
                continue;
            };
            let start = bests.len().saturating_sub(p.window);
            let recent = &bests[start..];
            match deal {
                None => {
                    if recent.len() >= p.min_history {
                        let r = lower_median(recent.iter().copied()).unwrap();
                        // (r - best) / r ≥ enter / 10000, as a cross-multiplication in i128
                        if (i128::from(r) - i128::from(best)) * 10_000
                            >= i128::from(r) * i128::from(p.enter_bp)
                        {
                            episodes += 1;
                            deal = Some((episodes, r, at));
                            out.push((TransitionKind::Entered, episodes, best, r));
                        }
                    }
                }
                Some((ep, r, since)) => {
                    let shrunk = (i128::from(r) - i128::from(best)) * 10_000
                        < i128::from(r) * i128::from(p.exit_bp);
                    let expired = at - since > p.max_deal_ms;
                    if expired || shrunk {
                        deal = None;
                        out.push((TransitionKind::Left, ep, best, r));
                    }
                    if expired {
                        // The low price became the regular price: older points are gone.
                        bests.clear();
                    }
                }
            }
            bests.push(best);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn matches_the_model_and_never_flaps(
            updates in proptest::collection::vec(
                (0u8..3, proptest::option::weighted(0.95, 500u64..1500), 0i64..50), 1..200),
            window in 3usize..10,
        ) {
            let p = DealParams { window, min_history: 3, max_deal_ms: 400, ..DealParams::default() };
            // Event time increases.
            let mut at = 0;
            let updates: Vec<_> = updates.into_iter().map(|(m, c, d)| { at += d; (m, c, at) }).collect();
            let mut s = ProductState::default();
            let mut got = Vec::new();
            for &(m, c, at) in &updates {
                let u = upd(&format!("m{m}"), c, at);
                if let Some(t) = s.apply(&u, &p) {
                    got.push(t);
                }
                prop_assert!(s.history.len() <= p.window);
            }
            let want = model(&p, &updates);
            let got_cmp: Vec<_> = got.iter().map(|t| (t.kind, t.episode, t.price, t.reference)).collect();
            prop_assert_eq!(&got_cmp, &want);
            // Alternation: Entered(1), Left(1), Entered(2), ... and entries meet the threshold.
            for (i, t) in got.iter().enumerate() {
                let kind = if i % 2 == 0 { TransitionKind::Entered } else { TransitionKind::Left };
                prop_assert_eq!(t.kind, kind);
                prop_assert_eq!(t.episode as usize, i / 2 + 1);
                prop_assert_eq!(&t.id, &format!("p1:{}", t.episode));
                if t.kind == TransitionKind::Entered {
                    prop_assert!(t.drop_bp >= p.enter_bp);
                }
            }
        }
    }
}
