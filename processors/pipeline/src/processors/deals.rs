//! `spool-deals`: each price update moves its product's state machine ([`crate::deals`]); a
//! change of state is emitted to `deal-transitions` (keyed by product) and copied to every
//! partition of `deal-broadcast` (matching's input). The product's state is the store
//! `products`, keyed by product id, in [`ProductState`]'s binary form.

use serde::Deserialize;
use spool_processor::{Context, Failure, Handler, Input};

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
    /// Partitions of `deal-broadcast` (= matching's partitions).
    pub broadcast_partitions: u32,
}

/// The deals processor.
#[derive(Debug)]
pub struct Deals {
    params: DealParams,
    broadcast_partitions: u32,
}

impl Deals {
    /// A processor with these settings (validated).
    pub fn new(s: DealsSettings) -> anyhow::Result<Deals> {
        s.heuristic.validate()?;
        anyhow::ensure!(
            s.broadcast_partitions >= 1,
            "[app] broadcast_partitions must be at least 1 (deal-broadcast's partition count)"
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
        if let Some(t) = t {
            emit_transition(ctx, &t, self.broadcast_partitions)?;
        }
        Ok(())
    }
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
        d.pipe_event(topics::PRICES, &update("p1", 950, 11));
        let out = d.read_events::<DealTransition>(topics::DEAL_TRANSITIONS);
        assert_eq!(
            (out[0].data.kind, out[0].id.as_str()),
            (TransitionKind::Left, "p1:1:left")
        );
    }
}
