//! `spool-passthrough`: the runtime's example processor. Copies every input record to the
//! topic `[app] output` (same partition, key and headers), with the value suffixed by
//! `|<n>`, where n counts the records of that key so far, kept in the state store `counts`.
//! Exactly once: for read-committed readers each input has one output, and the n of a key
//! run 1, 2, 3, … without gaps or repeats, through crashes of the processor and the broker.
//!
//! ```text
//! spool-passthrough --config passthrough.toml
//! # name = "passthrough"
//! # inputs = ["in"]
//! # outputs = ["out"]
//! # [app]
//! # output = "out"
//! ```

use serde::Deserialize;
use spool_client::ProducerRecord;
use spool_processor::{Context, Failure, Handler, Input};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Output topic.
    output: String,
}

struct PassThrough {
    output: String,
}

impl Handler for PassThrough {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let key = input.key.clone().unwrap_or_default();
        let mut counts = ctx.store("counts")?;
        let n = counts
            .get(&key)?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        counts.put(&key, n.to_string());
        let mut value = input.value.as_deref().unwrap_or_default().to_vec();
        value.extend_from_slice(format!("|{n}").as_bytes());
        let mut out = ProducerRecord::new(value).key(key);
        out.headers = input.headers.clone();
        out.timestamp_ms = Some(input.timestamp_ms);
        ctx.emit_to(self.output.clone(), input.partition, out);
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    spool_processor::app::main("passthrough", |cfg| {
        let s: Settings = cfg.app()?;
        Ok(PassThrough { output: s.output })
    })
}
