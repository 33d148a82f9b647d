//! `spool-bounces`: tails Postfix's log into `postfix-log` (with its position, exactly once)
//! and turns the lines into mail status, delivery issues and address flags. See
//! `spool_pipeline::processors::bounces`.

use anyhow::Context as _;
use clap::Parser;
use spool_pipeline::processors::bounces::{Bounces, BouncesSettings, run_tailer};
use spool_pipeline::processors::resolve_broadcast_partitions_blocking;
use spool_pipeline::topics;
use spool_processor::app;

fn main() -> anyhow::Result<()> {
    let args = app::Args::parse();
    let cfg = app::load_config("bounces", &args)?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let rcfg = app::runtime_config(&cfg, &args)?;
    app::init_logging();
    let mut settings: BouncesSettings = cfg.app()?;
    // address-status's real count (the setting is only checked against it).
    settings.address_partitions = resolve_broadcast_partitions_blocking(
        &cfg,
        topics::ADDRESS_STATUS,
        "address_partitions",
        settings.address_partitions,
    )?;
    let handler = Bounces::new(&settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        if settings.log_path.is_empty() || args.replay_from.is_some() {
            return app::serve(cfg, rcfg, handler).await;
        }
        let client = cfg.connect().await?;
        let txn_id = format!("{}-tailer-{}", rcfg.group, rcfg.instance_id);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let tailer = tokio::spawn(run_tailer(
            client,
            rcfg.instance_id.clone(),
            txn_id,
            settings,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let served = app::serve(cfg, rcfg, handler).await;
        let _ = stop_tx.send(());
        let tailed = tailer.await.context("tailer task")?;
        served.and(tailed)
    })
}
