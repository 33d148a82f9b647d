//! `spool-notifications`: renders and delivers notifications (SMTP to Postfix, webhook and
//! push over HTTP). See `spool_pipeline::processors::notifications`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("notifications", |cfg| {
        let mut s: spool_pipeline::processors::notifications::NotificationsSettings = cfg.app()?;
        // address-status's real count (the setting is only checked against it).
        s.address_partitions = spool_pipeline::processors::resolve_broadcast_partitions_blocking(
            cfg,
            spool_pipeline::topics::ADDRESS_STATUS,
            "address_partitions",
            s.address_partitions,
        )?;
        spool_pipeline::processors::notifications::Notifications::new(&s)
    })
}
