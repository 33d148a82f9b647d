//! `spool-deals`: each price update moves its product's state machine ([`crate::deals`]); a
//! change of state is emitted to `deal-transitions` (keyed by product) and copied to every
//! partition of `deal-broadcast` (matching's input). The product's state is the store
//! `products`, keyed by product id, in [`ProductState`]'s binary form.
//!
//! # Expiry without an update
//!
//! A deal in progress has a **stream-time timer** `expire/<product>` at
//! [`ProductState::expires_at_ms`] (its payload: the product's category and name, which the
//! `Left` carries and the state does not keep). Invariant: a product in a deal has exactly
//! that timer, at that time; a product not in a deal has none. An update that enters a deal
//! sets it, one that ends the deal cancels it, and one that finds a deal without it (stored
//! by an older version) or at another time (`max_deal_ms` changed) sets it; a timer that
//! fires before its deal is due (`max_deal_ms` raised) is set again. When the partition's stream time (the largest input
//! timestamp read: the feed's event time) passes it, [`ProductState::expire`] ends the deal
//! and the `Left` goes out as from an update. So a deal whose product is never updated again
//! (a merchant drops it from its feed, which is how feeds usually stop offering) still ends
//! `max_deal_ms` after it started, and matching frees its per-user entries. Stream time only
//! moves with input: a partition that receives no update at all fires nothing until one comes.

use serde::{Deserialize, Serialize};
use spool_processor::{Context, Failure, Handler, Input, Timer, TimerKind};

use crate::deals::{DealParams, ProductState};
use crate::events::{DealTransition, PriceUpdate, TransitionKind};
use crate::processors::{broadcast, emit};
use crate::topics;

/// `[app]` of `spool-deals`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DealsSettings {
    /// The heuristic.
    pub heuristic: DealParams,
    /// Partitions of `deal-broadcast` (= matching's partitions): 0 takes the topic's count at
    /// start; another value is the count expected, and the start is refused if the topic has
    /// another ([`crate::processors::resolve_broadcast_partitions`]).
    pub broadcast_partitions: u32,
}

/// The deals processor.
#[derive(Debug)]
pub struct Deals {
    params: DealParams,
    broadcast_partitions: u32,
}

impl Deals {
    /// A processor with these settings (validated); `broadcast_partitions` is the count
    /// resolved at start (the binary asks the broker), so at least 1.
    pub fn new(s: DealsSettings) -> anyhow::Result<Deals> {
        s.heuristic.validate()?;
        anyhow::ensure!(
            s.broadcast_partitions >= 1,
            "[app] broadcast_partitions must be at least 1 (deal-broadcast's partition count, \
             resolved from the broker at start)"
        );
        Ok(Deals {
            params: s.heuristic,
            broadcast_partitions: s.broadcast_partitions,
        })
    }
}

impl Handler for Deals {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let u: PriceUpdate = input.data::<PriceUpdate>()?;
        if u.price == Some(0) {
            // A feed error, not a free product: as a best price it would enter a deal with a
            // 100 % drop and alert the whole category.
            return Err(Failure::dead_letter(format!(
                "price update {:?} from {:?}: a price of 0",
                u.product, u.merchant
            )));
        }
        let mut products = ctx.store("products")?;
        let mut state = match products.get(u.product.as_bytes())? {
            None => ProductState::default(),
            // The store holds what this processor wrote: a state that does not decode is a
            // bug or a damaged store, not a bad input.
            Some(v) => ProductState::decode(&v).map_err(|e| {
                Failure::fatal(format!("store products, product {:?}: {e}", u.product))
            })?,
        };
        let t = state.apply(&u, &self.params);
        products.put(u.product.as_bytes(), state.encode());
        let key = [EXPIRE_PREFIX, u.product.as_bytes()].concat();
        match (&t, state.expires_at_ms(&self.params)) {
            (_, None) => {
                if t.is_some() {
                    ctx.cancel_timer(TimerKind::Stream, &key)?; // the deal ended
                }
            }
            (Some(_), Some(at)) => set_expiry(ctx, &key, at, &u)?, // entered
            (None, Some(at)) => {
                // Missing: a deal stored by an older version. Elsewhere: `max_deal_ms` changed.
                if ctx.timer(TimerKind::Stream, &key)? != Some(at) {
                    set_expiry(ctx, &key, at, &u)?;
                }
            }
        }
        if let Some(t) = t {
            emit_transition(ctx, &t, self.broadcast_partitions)?;
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
        let Some(product) = timer.key.strip_prefix(EXPIRE_PREFIX) else {
            return Ok(());
        };
        if timer.kind != TimerKind::Stream {
            return Ok(());
        }
        let names: ExpiryNames = serde_json::from_slice(&timer.payload)
            .map_err(|e| Failure::fatal(format!("deal expiry timer does not decode: {e}")))?;
        let product = std::str::from_utf8(product)
            .map_err(|_| Failure::fatal("deal expiry timer: product id is not UTF-8"))?;
        let mut products = ctx.store("products")?;
        let Some(v) = products.get(product.as_bytes())? else {
            return Ok(());
        };
        let mut state = ProductState::decode(&v)
            .map_err(|e| Failure::fatal(format!("store products, product {product:?}: {e}")))?;
        let t = state.expire(
            product,
            &names.category,
            &names.name,
            timer.at_ms,
            &self.params,
        );
        if t.is_some() {
            products.put(product.as_bytes(), state.encode());
        }
        let key = timer.key.clone();
        if let (None, Some(at)) = (&t, state.expires_at_ms(&self.params)) {
            // A deal that is not due yet (not reached: every entry moves the timer).
            ctx.set_timer(TimerKind::Stream, &key, at, timer.payload.clone())?;
        }
        if let Some(t) = t {
            emit_transition(ctx, &t, self.broadcast_partitions)?;
        }
        Ok(())
    }
}

/// Prefix of the deal-expiry timers' keys (`expire/<product>`).
const EXPIRE_PREFIX: &[u8] = b"expire/";

/// A deal-expiry timer's payload: what its `Left` names besides the state.
#[derive(Debug, Serialize, Deserialize)]
struct ExpiryNames {
    category: String,
    name: String,
}

/// Sets the expiry timer of `u`'s product's deal at `at` (stream time).
fn set_expiry(ctx: &mut Context<'_>, key: &[u8], at: i64, u: &PriceUpdate) -> Result<(), Failure> {
    let names = ExpiryNames {
        category: u.category.clone(),
        name: u.name.clone(),
    };
    let payload = serde_json::to_vec(&names).map_err(|e| Failure::fatal(e.to_string()))?;
    ctx.set_timer(TimerKind::Stream, key, at, payload)?;
    Ok(())
}

fn emit_transition(
    ctx: &mut Context<'_>,
    t: &DealTransition,
    partitions: u32,
) -> Result<(), Failure> {
    let kind = match t.kind {
        TransitionKind::Entered => "entered",
        TransitionKind::Left => "left",
    };
    let id = format!("{}:{kind}", t.id);
    emit(ctx, id.clone(), t, t.at_ms)?;
    broadcast(ctx, topics::DEAL_BROADCAST, partitions, id, t, t.at_ms)
}

#[cfg(test)]
mod tests {
    use spool_processor::testing::TestDriver;

    use super::*;
    use crate::processors::envelope;

    fn update(product: &str, price: u64, at: i64) -> spool_processor::Event<PriceUpdate> {
        let u = PriceUpdate {
            product: product.into(),
            merchant: "m1".into(),
            category: "books".into(),
            name: "Book".into(),
            price: Some(price),
            import: None,
            at_ms: at,
        };
        envelope("feed", format!("{product}@{at}"), &u, at)
    }

    #[test]
    fn transitions_through_the_runtime_survive_a_restart() {
        let deals = Deals::new(DealsSettings {
            broadcast_partitions: 3,
            ..DealsSettings::default()
        })
        .unwrap();
        let mut d = TestDriver::new("deals", deals).with_topic(topics::PRICES, 2);
        for (i, p) in [1000, 1000, 1000, 1000].iter().enumerate() {
            d.pipe_event(topics::PRICES, &update("p1", *p, i as i64));
        }
        assert!(
            d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS)
                .is_empty()
        );
        // State comes back from the changelog alone.
        d.restart();
        d.pipe_event(topics::PRICES, &update("p1", 700, 10));
        let out = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(
            (e.data.kind, e.data.price, e.data.reference, e.data.drop_bp),
            (TransitionKind::Entered, 700, 1000, 3000)
        );
        assert_eq!(e.id, "p1:1:entered");
        assert_eq!(e.ty, <DealTransition as crate::events::Event>::TYPE);
        let copies = d.read_output(topics::DEAL_BROADCAST);
        assert_eq!(
            copies.iter().map(|r| r.partition).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // A malformed update is a dead letter, not a crash.
        d.pipe(topics::PRICES, "p2", "not an event");
        assert_eq!(d.dead_letters(topics::PRICES).len(), 1);
        // So is a price of 0 (a feed error): no best price of 0, no deal.
        for i in 0..4 {
            d.pipe_event(topics::PRICES, &update("p4", 1000, i));
        }
        d.pipe_event(topics::PRICES, &update("p4", 0, 5));
        assert_eq!(d.dead_letters(topics::PRICES).len(), 1);
        assert!(
            d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS)
                .is_empty(),
            "a price of 0 entered a deal"
        );
        d.pipe_event(topics::PRICES, &update("p1", 950, 11));
        let out = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        assert_eq!(
            (out[0].data.kind, out[0].id.as_str()),
            (TransitionKind::Left, "p1:1:left")
        );
    }

    /// A deal whose product gets no further update ends `max_deal_ms` of stream time after it
    /// started (moved by other products' updates in its partition), once, across a restart;
    /// the same low price later is no new deal.
    #[test]
    fn a_deal_without_updates_expires_in_stream_time() {
        let deals = Deals::new(DealsSettings {
            heuristic: DealParams {
                max_deal_ms: 1_000,
                ..DealParams::default()
            },
            broadcast_partitions: 2,
        })
        .unwrap();
        let mut d = TestDriver::new("deals", deals);
        for i in 0..4 {
            d.pipe_event(topics::PRICES, &update("p1", 1000, i));
        }
        d.pipe_event(topics::PRICES, &update("p1", 700, 10));
        let out = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        assert_eq!(out[0].id, "p1:1:entered");
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), Some(1_011));
        d.restart();
        // Other products move stream time; p1 is never updated again.
        for at in [500, 1_000, 1_010] {
            d.pipe_event(topics::PRICES, &update("p2", 50, at));
        }
        assert!(
            d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS)
                .is_empty(),
            "not yet"
        );
        d.pipe_event(topics::PRICES, &update("p2", 50, 1_011));
        let out = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].id, "p1:1:left");
        assert_eq!(
            (out[0].data.kind, out[0].data.price, out[0].data.at_ms),
            (TransitionKind::Left, 700, 1_011)
        );
        assert_eq!(
            (out[0].data.category.as_str(), out[0].data.name.as_str()),
            ("books", "Book")
        );
        assert_eq!(d.read_output(topics::DEAL_BROADCAST).len(), 2 + 2);
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), None);
        // The next update of p1 at the same low price: no new deal, no new timer.
        d.pipe_event(topics::PRICES, &update("p1", 700, 1_020));
        d.pipe_event(topics::PRICES, &update("p2", 50, 5_000));
        assert!(
            d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS)
                .is_empty()
        );
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), None);
    }

    /// An update that ends a deal cancels its expiry timer; one that finds a deal without a
    /// timer (stored by an older version) sets it.
    #[test]
    fn the_expiry_timer_follows_the_deal() {
        let params = DealParams {
            max_deal_ms: 1_000,
            ..DealParams::default()
        };
        let deals = Deals::new(DealsSettings {
            heuristic: params,
            broadcast_partitions: 1,
        })
        .unwrap();
        let mut d = TestDriver::new("deals", deals);
        for i in 0..4 {
            d.pipe_event(topics::PRICES, &update("p1", 1000, i));
        }
        d.pipe_event(topics::PRICES, &update("p1", 700, 10));
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), Some(1_011));
        d.pipe_event(topics::PRICES, &update("p1", 990, 20));
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), None, "left");
        d.pipe_event(topics::PRICES, &update("p1", 600, 30));
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), Some(1_031));
        let events = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["p1:1:entered", "p1:1:left", "p1:2:entered"]);

        // A deal stored without its timer (as an older version stored it: the wrapper
        // below cancels the timer) gets one at its next update.
        struct OlderVersion(Deals);
        impl Handler for OlderVersion {
            fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
                if &*input.topic == "forget-timer" {
                    ctx.cancel_timer(TimerKind::Stream, b"expire/p1")?;
                    return Ok(());
                }
                self.0.handle(ctx, input)
            }
        }
        let deals = Deals::new(DealsSettings {
            heuristic: params,
            broadcast_partitions: 1,
        })
        .unwrap();
        let mut d = TestDriver::new("deals", OlderVersion(deals));
        for i in 0..4 {
            d.pipe_event(topics::PRICES, &update("p1", 1000, i));
        }
        d.pipe_event(topics::PRICES, &update("p1", 700, 10));
        d.pipe_record(spool_processor::testing::TestRecord {
            topic: "forget-timer".into(),
            timestamp_ms: Some(15), // (the driver's wall clock would move stream time)
            ..spool_processor::testing::TestRecord::default()
        });
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), None);
        d.pipe_event(topics::PRICES, &update("p1", 690, 20));
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), Some(1_011));
        // `max_deal_ms` lowered (a restart with a new config): the next update moves it.
        d.handler_mut().0.params.max_deal_ms = 500;
        d.pipe_event(topics::PRICES, &update("p1", 680, 30));
        assert_eq!(d.timer(0, TimerKind::Stream, b"expire/p1"), Some(511));
    }
}
