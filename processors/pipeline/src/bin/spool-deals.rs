//! `spool-deals`: price updates → deal transitions. See `spool_pipeline::processors::deals`.

/// mimalloc, not glibc malloc: allocation and free were ~20 % of the processors' CPU
/// (docs/benchmarks.md, deals_matching profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("deals", |cfg| {
        spool_pipeline::processors::deals::Deals::new(cfg.app()?)
    })
}
