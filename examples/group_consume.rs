//! A member of a consumer group with broker-side coordination: run it in several terminals
//! and the broker spreads the topic's partitions over them, moving partitions (committed
//! first) as members come and go.
//!
//! ```text
//! cargo run --example group_consume                                 # topic "demo", group "demo-group"
//! cargo run --example group_consume -- 127.0.0.1:7170 demo my-group host-1
//! ```
//! Arguments: `[BROKER] [TOPIC] [GROUP] [INSTANCE_ID]` (the broker defaults to
//! `$SPOOL_BROKER`, else `127.0.0.1:7170`). With an instance id the member is static: stop it
//! and start it again within the session timeout (10 s) and it gets its partitions back
//! without the other members being rebalanced. It prints its assignment whenever it changes
//! and the records it reads, commits every 100 records, and after 10 s without records
//! commits and exits (a static member keeps its membership until its session expires;
//! a dynamic one leaves).

use std::time::Duration;

use spool_client::{Client, GroupConfig, GroupConsumer};

const IDLE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .or_else(|| std::env::var("SPOOL_BROKER").ok())
        .unwrap_or_else(|| spool_client::DEFAULT_BROKER.to_owned());
    let topic = args.next().unwrap_or_else(|| "demo".to_owned());
    let group = args.next().unwrap_or_else(|| "demo-group".to_owned());
    let instance = args.next();

    let client = Client::connect(broker.as_str()).await?;
    let mut config = GroupConfig::new(group.as_str(), [topic.as_str()]);
    if let Some(i) = &instance {
        config = config.instance_id(i.as_str());
    }
    let mut member = GroupConsumer::join(&client, config).await?;
    let mut shown = Vec::new();
    let mut seen = 0u64;
    loop {
        let next = tokio::time::timeout(IDLE, member.next()).await;
        if member.assignment() != shown {
            shown = member.assignment();
            let parts: Vec<String> = shown
                .iter()
                .map(|tp| format!("{}/{}", tp.topic, tp.partition))
                .collect();
            println!(
                "member {} generation {}: owns [{}]",
                member.member_id().unwrap_or("?"),
                member.generation(),
                parts.join(", ")
            );
        }
        let record = match next {
            Err(_) | Ok(None) => break, // idle, or the membership stopped
            Ok(Some(r)) => r?,
        };
        seen += 1;
        let value = record.value.as_deref().map(String::from_utf8_lossy);
        println!(
            "{}/{} @{}: {}",
            record.topic,
            record.partition,
            record.offset,
            value.as_deref().unwrap_or("<null>")
        );
        if seen.is_multiple_of(100) {
            member.commit().await?;
        }
    }
    println!("read {seen} records; committing and closing");
    member.close().await?;
    Ok(())
}
