//! `spool-deals`: price updates → deal transitions. See `spool_pipeline::processors::deals`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("deals", |cfg| {
        spool_pipeline::processors::deals::Deals::new(cfg.app()?)
    })
}
