//! Writing the pipeline's inputs to a broker: its topics, the users' alert settings, campaigns
//! and the feed's import runs (price updates as CloudEvents, bracketed by `feed-imports` events: a
//! run's start with its merchants, then each merchant's end: the parts of the import job).

use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use spool_client::{
    CleanupPolicy, Client, Error, FetchOptions, OffsetSpec, Producer, ProducerConfig,
    TopicPartition, TopicSettings,
};

use crate::events::{
    AddressStatus, AlertSettings, Event, ImportEvent, ImportEventKind, NotificationRequest,
};
use crate::feed::Round;
use crate::processors::envelope;
use crate::topics::{self, Cleanup};

/// Creates every topic of the pipeline that does not exist yet (`partitions` overrides the
/// default count of the partitioned topics; compacted ones keep theirs unless they are
/// matching's co-partitioned inputs).
pub async fn ensure_topics(client: &Client, partitions: Option<u32>) -> Result<(), Error> {
    for t in topics::ALL {
        let mut s = TopicSettings::default();
        match t.cleanup {
            Cleanup::Compact => s.cleanup = Some(CleanupPolicy::Compact),
            Cleanup::Delete => s.retention_ms = t.retention_ms,
        }
        let n = match (partitions, t.partitions) {
            (Some(p), n) if n > 1 => p,
            (_, n) => n,
        };
        match client.create_topic(t.name, n, &s).await {
            Ok(_) | Err(Error::TopicExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn record<T: Event + Clone>(id: String, data: &T, at_ms: i64) -> spool_client::ProducerRecord {
    envelope("feed", id, data, at_ms)
        .to_record()
        .expect("pipeline events encode")
}

/// Writes users' settings to `user-settings` and waits until all are acknowledged.
pub async fn publish_users(producer: &Producer, users: &[AlertSettings]) -> Result<(), Error> {
    let mut pending = Vec::with_capacity(users.len());
    for u in users {
        pending.push(
            producer
                .send(
                    topics::USER_SETTINGS,
                    record(format!("{}@{}", u.user, u.at_ms), u, u.at_ms),
                )
                .await?,
        );
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// Writes one import run, at most `rate` updates per second (0: as fast as it goes), and
/// waits until everything is acknowledged. Returns the number of price updates.
pub async fn publish_round(producer: &Producer, round: &Round, rate: u64) -> Result<u64, Error> {
    publish_round_stalling(producer, round, rate, &[]).await
}

/// [`publish_round`], except that each merchant in `stalled` breaks off: it sends the first
/// half of its updates and never reports done, so the run's import job is reported stuck
/// naming it (a broken merchant feed, for demos and tests).
pub async fn publish_round_stalling(
    producer: &Producer,
    round: &Round,
    rate: u64,
    stalled: &[String],
) -> Result<u64, Error> {
    let start_ms = round.updates().next().map_or(0, |u| u.at_ms);
    let started = ImportEvent {
        import: round.import.clone(),
        kind: ImportEventKind::Started {
            merchants: round.parts.iter().map(|(m, _)| m.clone()).collect(),
        },
        at_ms: start_ms,
    };
    let mut pending = vec![
        producer
            .send(
                topics::FEED_IMPORTS,
                record(format!("{}:started", round.import), &started, start_ms),
            )
            .await?,
    ];
    let t0 = Instant::now();
    let mut sent = 0u64;
    for (merchant, updates) in &round.parts {
        let stalls = stalled.contains(merchant);
        let updates = if stalls {
            &updates[..updates.len() / 2]
        } else {
            &updates[..]
        };
        for u in updates {
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let id = format!("{}:{}:{}", round.import, u.merchant, u.product);
            pending.push(
                producer
                    .send(topics::PRICES, record(id, u, u.at_ms))
                    .await?,
            );
            sent += 1;
        }
        if stalls {
            continue;
        }
        let at = updates.last().map_or(start_ms, |u| u.at_ms);
        let done = ImportEvent {
            import: round.import.clone(),
            kind: ImportEventKind::MerchantDone {
                merchant: merchant.clone(),
                updates: updates.len() as u64,
            },
            at_ms: at,
        };
        pending.push(
            producer
                .send(
                    topics::FEED_IMPORTS,
                    record(format!("{}:{merchant}:done", round.import), &done, at),
                )
                .await?,
        );
        if pending.len() > 10_000 {
            for p in pending.drain(..) {
                p.await?;
            }
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(sent)
}

/// The addresses flagged unreachable now: `address-status` read to its last stable offset
/// (partition 0, which, like every partition, holds every flag), the latest status per
/// address winning, each address trimmed and ASCII-lowercased (as matching keeps them). What
/// a campaign tool checks before writing a campaign.
pub async fn flagged_addresses(client: &Client) -> Result<BTreeSet<String>, Error> {
    let tp = TopicPartition::new(topics::ADDRESS_STATUS, 0);
    let listed = client
        .list_offsets(&[(tp, OffsetSpec::Earliest)])
        .await?
        .remove(0)?;
    let mut offset = listed.offset;
    let mut flagged = BTreeSet::new();
    loop {
        let f = client
            .fetch(topics::ADDRESS_STATUS, 0, offset, &FetchOptions::default())
            .await?;
        for r in &f.records {
            // A record that does not decode is not a flag (bounces writes only these).
            let Ok(e) = spool_processor::envelope::decode::<AddressStatus>(
                &r.headers,
                r.key.as_ref(),
                r.value.as_ref(),
            ) else {
                continue;
            };
            // Normalised as matching does (trimmed, ASCII lowercase).
            let address = e.data.address.trim().to_ascii_lowercase();
            if e.data.unreachable {
                flagged.insert(address);
            } else {
                flagged.remove(&address);
            }
        }
        if f.next_offset >= f.last_stable_offset || f.next_offset <= offset {
            return Ok(flagged);
        }
        offset = f.next_offset;
    }
}

/// Writes a campaign's requests ([`crate::campaign::requests`]) to `campaign-requests` and
/// waits until all are acknowledged.
pub async fn publish_campaign(
    producer: &Producer,
    requests: &[NotificationRequest],
) -> Result<(), Error> {
    let mut pending = Vec::with_capacity(requests.len());
    for n in requests {
        pending.push(
            producer
                .send(topics::CAMPAIGN_REQUESTS, record(n.id.clone(), n, n.at_ms))
                .await?,
        );
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// A producer for the feed (idempotent, durable acks, the defaults).
pub fn producer(client: &Client) -> Producer {
    client.producer(ProducerConfig::default())
}
