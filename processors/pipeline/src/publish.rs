//! Writing the pipeline's inputs to a broker: its topics, the users' alert settings, campaigns
//! and the feed's import runs (price updates as CloudEvents, bracketed by `feed-imports` events: a
//! run's start with its merchants, then each merchant's end: the parts of the import job).

use std::time::{Duration, Instant};

use spool_client::{CleanupPolicy, Client, Error, Producer, ProducerConfig, TopicSettings};

use crate::events::{AlertSettings, Event, ImportEvent, ImportEventKind, NotificationRequest};
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
