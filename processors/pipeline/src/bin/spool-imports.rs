//! `spool-imports`: feed import runs → "import completed" / "import stuck: merchants …" on
//! `import-status`. See `spool_pipeline::processors::imports`.
fn main() -> anyhow::Result<()> {
    spool_processor::app::main("imports", |cfg| {
        spool_pipeline::processors::imports::Imports::new(cfg.app()?)
    })
}
