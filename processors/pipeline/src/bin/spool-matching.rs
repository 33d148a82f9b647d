//! `spool-matching`: deal transitions × alert settings → notification requests and timeline
//! events. See `spool_pipeline::processors::matching`.

/// mimalloc, not glibc malloc: allocation and free were ~20 % of the processors' CPU
/// (docs/benchmarks.md, deals_matching profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("matching", |cfg| {
        spool_pipeline::processors::matching::check_tables(&cfg.tables)?;
        Ok(spool_pipeline::processors::matching::Matching::new(
            cfg.app()?,
        ))
    })
}
