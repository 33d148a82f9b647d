//! `spool-matching`: deal transitions × alert settings → notification requests and timeline
//! events. See `spool_pipeline::processors::matching`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("matching", |cfg| {
        Ok(spool_pipeline::processors::matching::Matching::new(
            cfg.app()?,
        ))
    })
}
