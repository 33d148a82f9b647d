//! `spool-matching`: deal transitions × alert settings → notification requests and timeline
//! events. See `spool_pipeline::processors::matching`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("matching", |cfg| {
        spool_pipeline::processors::matching::check_tables(&cfg.tables)?;
        Ok(spool_pipeline::processors::matching::Matching::new(
            cfg.app()?,
        ))
    })
}
