//! `spool-deals`: price updates → deal transitions. See `spool_pipeline::processors::deals`.

/// mimalloc, not glibc malloc: allocation and free were ~20 % of the processors' CPU
/// (docs/benchmarks.md, deals_matching profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("deals", |cfg| {
        let mut s: spool_pipeline::processors::deals::DealsSettings = cfg.app()?;
        // deal-broadcast's real count (the setting is only checked against it).
        s.broadcast_partitions = spool_pipeline::processors::resolve_broadcast_partitions_blocking(
            cfg,
            spool_pipeline::topics::DEAL_BROADCAST,
            "broadcast_partitions",
            s.broadcast_partitions,
        )?;
        spool_pipeline::processors::deals::Deals::new(s)
    })
}
