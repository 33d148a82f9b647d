//! Exactly-once "consume, transform, produce": a member of a consumer group reads a topic,
//! writes a transformed record per input record to another topic, and commits the input
//! offsets **in the same transaction** as the outputs, so after any crash (of this process or
//! of the broker) every input record has its output exactly once for read-committed readers.
//!
//! ```text
//! cargo run --example transactional                       # prices -> prices-upper, group "upper"
//! cargo run --example transactional -- 127.0.0.1:7170 prices prices-upper upper upper-1
//! ```
//! Arguments: `[BROKER] [IN] [OUT] [GROUP] [TRANSACTIONAL_ID]` (the broker defaults to
//! `$SPOOL_BROKER`, else `127.0.0.1:7170`; OUT is created with IN's partition count if
//! missing). The transactional id must be stable per running instance (e.g. the host name):
//! a restarted instance fences its previous incarnation and aborts what it left open. Exits
//! after 10 s without input, or on any error (systemd restarts it; it resumes from the last
//! committed transaction: nothing is skipped or duplicated).

use std::collections::BTreeMap;
use std::time::Duration;

use spool_client::{
    Client, GroupConfig, GroupConsumer, OffsetCommit, ProducerRecord, TopicSettings,
    TransactionalConfig, TransactionalProducer,
};

const BATCH: usize = 100;
const IDLE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .or_else(|| std::env::var("SPOOL_BROKER").ok())
        .unwrap_or_else(|| spool_client::DEFAULT_BROKER.to_owned());
    let input = args.next().unwrap_or_else(|| "prices".to_owned());
    let output = args.next().unwrap_or_else(|| format!("{input}-upper"));
    let group = args.next().unwrap_or_else(|| "upper".to_owned());
    let txn_id = args.next().unwrap_or_else(|| format!("{group}-1"));

    let client = Client::connect(broker.as_str()).await?;
    if client.describe_topic(&output).await.is_err() {
        let partitions = client.describe_topic(&input).await?.partitions.len() as u32;
        client
            .create_topic(&output, partitions, &TopicSettings::default())
            .await?;
    }
    // Offsets are committed by the transactions only: never on revocation.
    let mut config = GroupConfig::new(group.as_str(), [input.as_str()]);
    config.commit_on_revoke = false;
    let mut member = GroupConsumer::join(&client, config).await?;
    let mut tx =
        TransactionalProducer::new(client.clone(), TransactionalConfig::new(txn_id)).await?;
    let mut done = 0u64;
    loop {
        // Up to BATCH records (waiting at most IDLE for the first one).
        let mut records = Vec::new();
        while records.len() < BATCH {
            let wait = if records.is_empty() {
                IDLE
            } else {
                Duration::from_millis(50)
            };
            match tokio::time::timeout(wait, member.next()).await {
                Ok(Some(r)) => records.push(r?),
                _ => break,
            }
        }
        if records.is_empty() {
            break;
        }
        tx.begin()?;
        let mut next: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for r in &records {
            let upper = r.value.as_deref().unwrap_or_default().to_ascii_uppercase();
            let mut out = ProducerRecord::new(upper);
            if let Some(k) = &r.key {
                out = out.key(k.clone());
            }
            tx.send(&output, r.partition, out).await?;
            next.insert((r.topic.to_string(), r.partition), r.offset + 1);
        }
        let offsets: Vec<OffsetCommit> = next
            .into_iter()
            .map(|((topic, partition), offset)| OffsetCommit {
                topic,
                partition,
                offset,
                metadata: String::new(),
            })
            .collect();
        // Fenced by the member's generation: if a rebalance took a partition away meanwhile,
        // the commit is refused and the transaction aborted (its new owner redoes the work).
        let member_id = member.member_id().unwrap_or_default().to_owned();
        let outcome = async {
            tx.send_offsets(&group, &offsets, Some((&member_id, member.generation())))
                .await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = outcome {
            tx.abort().await.ok();
            // This process's positions are now ahead of what is committed: start over from
            // the committed offsets (systemd's restart does that).
            return Err(format!("transaction aborted: {e}").into());
        }
        done += records.len() as u64;
        println!("committed {} records ({done} so far)", records.len());
    }
    println!("{done} records transformed exactly once; leaving the group");
    member.leave().await?;
    Ok(())
}
