//! `spool-notifications`: renders and delivers notifications (SMTP to Postfix, webhook and
//! push over HTTP). See `spool_pipeline::processors::notifications`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("notifications", |cfg| {
        spool_pipeline::processors::notifications::Notifications::new(&cfg.app()?)
    })
}
