//! `spool-feed`: the seeded price feed. Creates the pipeline's topics if missing, writes the
//! users' alert settings, then import runs of price updates.
//!
//! ```text
//! spool-feed --broker 127.0.0.1:7170 --seed 7 --products 1000 --users 200 --rounds 10 --rate 2000 \
//!            --webhook http://127.0.0.1:8081 --push http://127.0.0.1:8082
//! ```

use anyhow::Context as _;
use clap::Parser;
use spool_pipeline::feed::{Endpoints, Feed, FeedConfig};
use spool_pipeline::publish;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Broker.
    #[arg(long, env = "SPOOL_BROKER", default_value = "127.0.0.1:7170")]
    broker: String,
    /// Seed: the same seed gives the same catalogue, users and prices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Products.
    #[arg(long, default_value_t = 1_000)]
    products: usize,
    /// Categories.
    #[arg(long, default_value_t = 8)]
    categories: usize,
    /// Merchants (one part of each import run each).
    #[arg(long, default_value_t = 10)]
    merchants: usize,
    /// Users (0: write no settings).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Import runs to produce (0: until stopped).
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Price updates per second at most (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Share of users with undeliverable e-mail, basis points.
    #[arg(long, default_value_t = 1_000)]
    undeliverable_bp: u32,
    /// Base URL of the webhook receiver (users' webhook URLs).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    webhook: String,
    /// Base URL of the push gateway.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    push: String,
    /// A merchant whose feed breaks off in every run (repeatable): it sends half its updates
    /// and never reports done, so `spool-imports` reports the run stuck naming it.
    #[arg(long = "stall", value_name = "MERCHANT")]
    stall: Vec<String>,
    /// Partitions of the partitioned topics when creating them.
    #[arg(long)]
    partitions: Option<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = spool_client::Client::connect(a.broker.as_str())
        .await
        .context("connecting")?;
    publish::ensure_topics(&client, a.partitions).await?;
    let cfg = FeedConfig {
        seed: a.seed,
        products: a.products,
        categories: a.categories,
        merchants: a.merchants,
        users: a.users,
        undeliverable_bp: a.undeliverable_bp,
        ..FeedConfig::default()
    };
    let mut feed = Feed::new(cfg);
    let producer = publish::producer(&client);
    if a.users > 0 {
        let users = feed.users(&Endpoints {
            webhook: a.webhook.clone(),
            push: a.push.clone(),
        });
        publish::publish_users(&producer, &users).await?;
        eprintln!("{} users' alert settings written", users.len());
    }
    let mut round = 0;
    while a.rounds == 0 || round < a.rounds {
        let r = feed.next_round();
        let n = publish::publish_round_stalling(&producer, &r, a.rate, &a.stall).await?;
        eprintln!(
            "{}: {n} price updates from {} merchants",
            r.import,
            r.parts.len()
        );
        round += 1;
    }
    producer.close().await;
    Ok(())
}
