//! The seeded price feed and user base.
//!
//! `N` products in `C` categories, each offered by 1-3 of `M` merchants at a base price. A
//! **round** is one import run (`import-000001`, ...): every merchant sends its feed (one part
//! per merchant, in merchant order), and each of its offers changes with probability
//! `update_bp`: a random walk of up to ±2 % around the base (clamped to ±15 %); a product not
//! in a promotion starts one with probability `drop_bp` (its merchant cuts the price to 55-75 %
//! of the base), and a promotion ends with probability `recover_bp` per round (back to 95-105 %).
//! Users get 1-3 categories, a minimum drop of 10-40 %, 1-3 channels and an e-mail address
//! that is deliverable at the local Postfix unless they are among the `undeliverable_bp`
//! share (unknown mailbox, a hard-bouncing domain or a deferring one, in turn).
//!
//! Everything is a function of the seed (PCG-64 streams, one for the catalogue, one per round,
//! one for users), so the oracle in the tests, the bring-up and the benchmarks see the same
//! data. Event times are `start_ms + round × round_ms + position` (strictly increasing).

use rand::{Rng, RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use crate::events::{AlertSettings, Cents, Channel, PriceUpdate, QuietHours};

const CATEGORY_NAMES: &[&str] = &[
    "video-games",
    "mobile-phones",
    "laptops",
    "televisions",
    "headphones",
    "cameras",
    "books",
    "shoes",
    "apparel",
    "toys",
    "kitchen",
    "garden",
    "tools",
    "watches",
    "perfume",
    "sports",
];
const NOUNS: &[&str] = &[
    "Console", "Phone", "Laptop", "TV", "Headset", "Camera", "Novel", "Sneaker", "Jacket", "Robot",
];
const ADJECTIVES: &[&str] = &["Pro", "Max", "Lite", "Ultra", "Mini", "Plus", "Air", "Neo"];
const ZONES: &[&str] = &[
    "Europe/Athens",
    "Europe/London",
    "America/New_York",
    "Asia/Tokyo",
    "UTC",
];

/// Feed settings (flags of `spool-feed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    /// The seed.
    pub seed: u64,
    /// Products.
    pub products: usize,
    /// Categories (at most 16 named ones; more get numbered names).
    pub categories: usize,
    /// Merchants.
    pub merchants: usize,
    /// Users.
    pub users: usize,
    /// Chance an offer changes in a round, basis points.
    pub update_bp: u32,
    /// Chance a product's offer starts a promotion in a round, basis points.
    pub drop_bp: u32,
    /// Chance a promotion ends in a round, basis points.
    pub recover_bp: u32,
    /// Share of users with an undeliverable e-mail address, basis points.
    pub undeliverable_bp: u32,
    /// Event time of round 0, ms.
    pub start_ms: i64,
    /// Event time between rounds, ms.
    pub round_ms: i64,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            seed: 1,
            products: 1_000,
            categories: 8,
            merchants: 10,
            users: 200,
            update_bp: 5_000,
            drop_bp: 150,
            recover_bp: 3_000,
            undeliverable_bp: 1_000,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            round_ms: 15 * 60 * 1000,
        }
    }
}

/// A product of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Id (`p000042`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Category.
    pub category: String,
    /// Base price.
    pub base: Cents,
}

#[derive(Debug, Clone)]
struct Offer {
    product: usize,
    price: Cents,
    promo: bool,
}

/// One import run: every merchant's updates, merchant by merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Import id.
    pub import: String,
    /// `(merchant, its updates)` in merchant order (merchants without changes included).
    pub parts: Vec<(String, Vec<PriceUpdate>)>,
}

impl Round {
    /// All updates in production order.
    pub fn updates(&self) -> impl Iterator<Item = &PriceUpdate> {
        self.parts.iter().flat_map(|(_, u)| u)
    }
}

/// Where the generated users' webhook and push calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Base URL of the webhook receiver (`http://127.0.0.1:PORT`).
    pub webhook: String,
    /// Base URL of the push gateway.
    pub push: String,
}

/// How a generated e-mail address behaves at the local Postfix (the recipe's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    /// `uNNNNNN@localhost`, a mailbox: delivered.
    Deliverable,
    /// `ghost-uNNNNNN@localhost`: unknown user, bounced 5.1.1.
    UnknownUser,
    /// `uNNNNNN@hardbounce.test`: bounced 5.1.1.
    HardBounce,
    /// `uNNNNNN@defer.test`: deferred, then expired (a soft bounce: not flagged).
    Defer,
}

/// Classifies an address the feed generated.
pub fn address_kind(address: &str) -> AddressKind {
    if address.ends_with("@hardbounce.test") {
        AddressKind::HardBounce
    } else if address.ends_with("@defer.test") {
        AddressKind::Defer
    } else if address.starts_with("ghost-") {
        AddressKind::UnknownUser
    } else {
        AddressKind::Deliverable
    }
}

/// `(address, mailbox name)` of the users whose e-mail is deliverable at the local Postfix
/// (the instance's mailboxes, [`crate::postfix::instance::Instance::set_mailboxes`]).
pub fn mailboxes(users: &[AlertSettings]) -> Vec<(String, String)> {
    users
        .iter()
        .filter_map(|u| u.email.clone().map(|e| (e, u.user.clone())))
        .filter(|(e, _)| address_kind(e) == AddressKind::Deliverable)
        .collect()
}

/// The generator.
#[derive(Debug, Clone)]
pub struct Feed {
    cfg: FeedConfig,
    products: Vec<Product>,
    /// Per merchant: its offers.
    offers: Vec<Vec<Offer>>,
    categories: Vec<String>,
    round: u64,
}

fn stream(seed: u64, stream: u64) -> Pcg64Mcg {
    Pcg64Mcg::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn chance(rng: &mut impl Rng, bp: u32) -> bool {
    rng.random_range(0..10_000u32) < bp
}

fn scale(base: Cents, pct_lo: u64, pct_hi: u64, rng: &mut impl Rng) -> Cents {
    (base * rng.random_range(pct_lo..=pct_hi) / 1000).max(1)
}

impl Feed {
    /// The catalogue for `cfg` (no update produced yet).
    pub fn new(cfg: FeedConfig) -> Feed {
        let mut rng = stream(cfg.seed, 1);
        let categories: Vec<String> = (0..cfg.categories.max(1))
            .map(|i| {
                CATEGORY_NAMES
                    .get(i)
                    .map_or_else(|| format!("category-{i}"), |s| s.to_string())
            })
            .collect();
        let merchants = cfg.merchants.max(1);
        let mut offers: Vec<Vec<Offer>> = vec![Vec::new(); merchants];
        let mut products = Vec::with_capacity(cfg.products);
        for i in 0..cfg.products {
            let category = categories[rng.random_range(0..categories.len())].clone();
            let name = format!(
                "{} {} {}",
                NOUNS[rng.random_range(0..NOUNS.len())],
                ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                100 + i
            );
            let base: Cents = rng.random_range(500..200_000);
            let carriers = rng.random_range(1..=3usize.min(merchants));
            let first = rng.random_range(0..merchants);
            for k in 0..carriers {
                let m = (first + k * 7) % merchants;
                if offers[m].iter().any(|o| o.product == i) {
                    continue;
                }
                let price = scale(base, 950, 1050, &mut rng);
                offers[m].push(Offer {
                    product: i,
                    price,
                    promo: false,
                });
            }
            products.push(Product {
                id: format!("p{i:06}"),
                name,
                category,
                base,
            });
        }
        Feed {
            cfg,
            products,
            offers,
            categories,
            round: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FeedConfig {
        &self.cfg
    }
    /// The catalogue.
    pub fn products(&self) -> &[Product] {
        &self.products
    }
    /// Category names.
    pub fn categories(&self) -> &[String] {
        &self.categories
    }
    /// Merchant ids.
    pub fn merchants(&self) -> Vec<String> {
        (0..self.offers.len()).map(|m| format!("m{m:03}")).collect()
    }

    /// The next import run. Round 1 lists every offer (the initial import); later rounds only
    /// the offers that changed.
    pub fn next_round(&mut self) -> Round {
        self.round += 1;
        let round = self.round;
        let mut rng = stream(self.cfg.seed, 1_000 + round);
        let import = format!("import-{round:06}");
        let mut seq = 0i64;
        let t0 = self.cfg.start_ms + round as i64 * self.cfg.round_ms;
        let mut parts = Vec::with_capacity(self.offers.len());
        for (m, offers) in self.offers.iter_mut().enumerate() {
            let merchant = format!("m{m:03}");
            let mut updates = Vec::new();
            for o in offers.iter_mut() {
                let p = &self.products[o.product];
                let changed = if round == 1 {
                    true
                } else if !chance(&mut rng, self.cfg.update_bp) {
                    false
                } else if o.promo {
                    if chance(&mut rng, self.cfg.recover_bp) {
                        o.promo = false;
                        o.price = scale(p.base, 950, 1050, &mut rng);
                    }
                    true
                } else if chance(&mut rng, self.cfg.drop_bp) {
                    o.promo = true;
                    o.price = scale(p.base, 550, 750, &mut rng);
                    true
                } else {
                    let step = scale(o.price, 980, 1020, &mut rng);
                    o.price = step.clamp(p.base * 85 / 100, p.base * 115 / 100).max(1);
                    true
                };
                if changed {
                    seq += 1;
                    updates.push(PriceUpdate {
                        product: p.id.clone(),
                        merchant: merchant.clone(),
                        category: p.category.clone(),
                        name: p.name.clone(),
                        price: Some(o.price),
                        import: Some(import.clone()),
                        at_ms: t0 + seq,
                    });
                }
            }
            parts.push((merchant, updates));
        }
        Round { import, parts }
    }

    /// The users, with webhook and push URLs under `endpoints`.
    pub fn users(&self, endpoints: &Endpoints) -> Vec<AlertSettings> {
        let mut rng = stream(self.cfg.seed, 2);
        let mut undeliverable = 0usize;
        (0..self.cfg.users)
            .map(|i| {
                let user = format!("u{i:06}");
                let n = rng.random_range(1..=3usize.min(self.categories.len()));
                let mut categories: Vec<String> = (0..n)
                    .map(|_| self.categories[rng.random_range(0..self.categories.len())].clone())
                    .collect();
                categories.sort();
                categories.dedup();
                let min_drop_bp = [1_000, 2_000, 2_500, 3_000, 4_000][rng.random_range(0..5)];
                let mut channels = vec![Channel::Email];
                if chance(&mut rng, 4_000) {
                    channels.push(Channel::Webhook);
                }
                if chance(&mut rng, 4_000) {
                    channels.push(Channel::Push);
                }
                if chance(&mut rng, 1_000) {
                    channels.remove(0); // no e-mail at all
                    if channels.is_empty() {
                        channels.push(Channel::Push);
                    }
                }
                let email = if chance(&mut rng, self.cfg.undeliverable_bp) {
                    undeliverable += 1;
                    match undeliverable % 3 {
                        0 => format!("ghost-{user}@localhost"),
                        1 => format!("{user}@hardbounce.test"),
                        _ => format!("{user}@defer.test"),
                    }
                } else {
                    format!("{user}@localhost")
                };
                let time_zone = ZONES[rng.random_range(0..ZONES.len())].to_owned();
                let quiet_hours = chance(&mut rng, 3_000).then_some(QuietHours {
                    start_min: 22 * 60,
                    end_min: 7 * 60,
                });
                AlertSettings {
                    user: user.clone(),
                    name: format!("User {i}"),
                    categories,
                    min_drop_bp,
                    channels,
                    email: Some(email),
                    webhook_url: Some(format!("{}/hook/{user}", endpoints.webhook)),
                    push_url: Some(format!("{}/push/{user}", endpoints.push)),
                    time_zone,
                    quiet_hours,
                    at_ms: self.cfg.start_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::deals::{DealParams, ProductState};

    fn endpoints() -> Endpoints {
        Endpoints {
            webhook: "http://h".into(),
            push: "http://p".into(),
        }
    }

    #[test]
    fn deterministic_by_seed() {
        let cfg = FeedConfig {
            products: 50,
            users: 20,
            ..FeedConfig::default()
        };
        let mut a = Feed::new(cfg.clone());
        let mut b = Feed::new(cfg.clone());
        for _ in 0..5 {
            assert_eq!(a.next_round(), b.next_round());
        }
        assert_eq!(a.users(&endpoints()), b.users(&endpoints()));
        let mut c = Feed::new(FeedConfig { seed: 2, ..cfg });
        assert_ne!(
            Feed::new(FeedConfig {
                products: 50,
                ..FeedConfig::default()
            })
            .next_round(),
            c.next_round()
        );
    }

    #[test]
    fn shape_of_the_default_feed_produces_deals_and_undeliverable_users() {
        let mut f = Feed::new(FeedConfig::default());
        let first = f.next_round();
        assert_eq!(first.parts.len(), 10);
        let offers = first.updates().count();
        assert!(
            offers >= 1_000,
            "every product offered at least once: {offers}"
        );
        // Event times strictly increase within a round and across rounds.
        let second = f.next_round();
        let times: Vec<i64> = first
            .updates()
            .chain(second.updates())
            .map(|u| u.at_ms)
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        // Deals happen with the default heuristic within a few rounds.
        let p = DealParams::default();
        let mut states: BTreeMap<String, ProductState> = BTreeMap::new();
        let mut entered = 0;
        let mut left = 0;
        for r in std::iter::once(first)
            .chain(std::iter::once(second))
            .chain((0..18).map(|_| f.next_round()))
        {
            for u in r.updates() {
                if let Some(t) = states.entry(u.product.clone()).or_default().apply(u, &p) {
                    match t.kind {
                        crate::events::TransitionKind::Entered => entered += 1,
                        crate::events::TransitionKind::Left => left += 1,
                    }
                }
            }
        }
        assert!(entered > 20 && left > 5, "entered {entered}, left {left}");
        let users = f.users(&endpoints());
        let undeliverable = users
            .iter()
            .filter(|u| address_kind(u.email.as_deref().unwrap()) != AddressKind::Deliverable)
            .count();
        assert!((5..=50).contains(&undeliverable), "{undeliverable}");
        for kind in [
            AddressKind::UnknownUser,
            AddressKind::HardBounce,
            AddressKind::Defer,
        ] {
            assert!(
                users
                    .iter()
                    .any(|u| address_kind(u.email.as_deref().unwrap()) == kind),
                "{kind:?}"
            );
        }
    }
}
