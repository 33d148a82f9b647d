//! The independent oracle: from the feed's seed, what the pipeline must deliver.
//!
//! It shares only the *inputs* (the seeded feed and users) and the id derivation (a spec: a
//! hash of transition, user and channel) with the code under test; the deal heuristic and the
//! fan-out are re-derived here from their documented rules (docs/pipeline.md), over the full
//! price history with no incremental state, and users are matched by scanning everyone.
//!
//! E-mail flags take effect **between phases**: an address that bounces hard (unknown user or
//! a hard-bouncing domain) is flagged once it has been mailed, and mail in later phases skips
//! it. (Within a phase the oracle assumes no flag arrives: the test waits for the bounces of
//! one phase before starting the next.)

use std::collections::{BTreeMap, BTreeSet};

use spool_pipeline::events::{AlertSettings, Channel};
use spool_pipeline::feed::{AddressKind, Feed, FeedConfig, address_kind};
use spool_pipeline::ids::notification_id;

/// Heuristic constants from docs/pipeline.md (the defaults of `[deals]`).
const WINDOW: usize = 16;
const MIN_HISTORY: usize = 4;
const ENTER_BP: u64 = 2_000;
const EXIT_BP: u64 = 1_000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Mail ids handed to Postfix, per address.
    pub emails: BTreeMap<String, BTreeSet<String>>,
    /// Webhook calls: (path, notification id).
    pub webhooks: BTreeSet<(String, String)>,
    /// Push calls: (path, notification id).
    pub pushes: BTreeSet<(String, String)>,
    /// Timeline: (user, "add"/"remove", entry).
    pub timeline: BTreeSet<(String, &'static str, String)>,
    /// Addresses flagged unreachable at the end.
    pub flagged: BTreeSet<String>,
    /// Addresses flagged after each phase.
    pub flagged_after: Vec<BTreeSet<String>>,
    /// Deal transitions by event id (`PRODUCT:EPISODE:entered` / `:left`).
    pub transitions: BTreeSet<String>,
    /// Deals entered / left.
    pub entered: usize,
    pub left: usize,
}

struct Product {
    offers: BTreeMap<String, u64>,
    bests: Vec<u64>,
    deal: Option<(u32, u64)>, // (episode, frozen reference)
    episodes: u32,
    notified: Vec<String>,
}

/// Runs `phases[i]` rounds in phase i.
pub fn expect(cfg: &FeedConfig, users: &[AlertSettings], phases: &[usize]) -> Expected {
    let mut feed = Feed::new(cfg.clone());
    let mut products: BTreeMap<String, Product> = BTreeMap::new();
    let mut ex = Expected::default();
    let mut flagged: BTreeSet<String> = BTreeSet::new();
    for &rounds in phases {
        let mut mailed_this_phase: BTreeSet<String> = BTreeSet::new();
        for _ in 0..rounds {
            let round = feed.next_round();
            for u in round.updates() {
                let p = products
                    .entry(u.product.clone())
                    .or_insert_with(|| Product {
                        offers: BTreeMap::new(),
                        bests: Vec::new(),
                        deal: None,
                        episodes: 0,
                        notified: Vec::new(),
                    });
                match u.price {
                    Some(c) => {
                        p.offers.insert(u.merchant.clone(), c);
                    }
                    None => {
                        p.offers.remove(&u.merchant);
                    }
                }
                let best = *p
                    .offers
                    .values()
                    .min()
                    .expect("the feed never withdraws offers");
                let recent: Vec<u64> = p.bests.iter().rev().take(WINDOW).copied().collect();
                match p.deal {
                    None if recent.len() >= MIN_HISTORY => {
                        let mut sorted = recent.clone();
                        sorted.sort();
                        let median = sorted[(sorted.len() - 1) / 2];
                        // drop ≥ 20 %  ⇔  100·(median − best) ≥ 20·median, in basis points
                        if best <= median && (median - best) * 10_000 >= ENTER_BP * median {
                            p.episodes += 1;
                            p.deal = Some((p.episodes, median));
                            ex.entered += 1;
                            let drop = (median - best) * 10_000 / median;
                            let entry = format!("{}:{}", u.product, p.episodes);
                            ex.transitions.insert(format!("{entry}:entered"));
                            for s in users {
                                if !s.categories.contains(&u.category)
                                    || u64::from(s.min_drop_bp) > drop
                                {
                                    continue;
                                }
                                ex.timeline.insert((s.user.clone(), "add", entry.clone()));
                                p.notified.push(s.user.clone());
                                for ch in &s.channels {
                                    let id = notification_id(&entry, &s.user, *ch);
                                    match ch {
                                        Channel::Email => {
                                            let addr = s.email.clone().unwrap();
                                            if !flagged.contains(&addr) {
                                                mailed_this_phase.insert(addr.clone());
                                                ex.emails.entry(addr).or_default().insert(id);
                                            }
                                        }
                                        Channel::Webhook => {
                                            ex.webhooks.insert((format!("/hook/{}", s.user), id));
                                        }
                                        Channel::Push => {
                                            ex.pushes.insert((format!("/push/{}", s.user), id));
                                        }
                                    }
                                }
                            }
                        }
                    }
                    None => {}
                    // leaves when the drop is under 10 %: best > reference·0.9
                    Some((episode, reference))
                        if best * 10_000 > reference * (10_000 - EXIT_BP) =>
                    {
                        p.deal = None;
                        ex.left += 1;
                        let entry = format!("{}:{}", u.product, episode);
                        ex.transitions.insert(format!("{entry}:left"));
                        for user in p.notified.drain(..) {
                            ex.timeline.insert((user, "remove", entry.clone()));
                        }
                    }
                    Some(_) => {}
                }
                p.bests.push(best);
            }
        }
        for a in mailed_this_phase {
            if matches!(
                address_kind(&a),
                AddressKind::HardBounce | AddressKind::UnknownUser
            ) {
                flagged.insert(a);
            }
        }
        ex.flagged_after.push(flagged.clone());
    }
    ex.flagged = flagged;
    ex
}
