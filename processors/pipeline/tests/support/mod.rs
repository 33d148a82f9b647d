//! Test support for the pipeline's integration tests: HTTP receivers and the oracle.
#![allow(dead_code, unreachable_pub)]

pub mod oracle;
pub mod procs;
pub mod receiver;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::Path;

use spool_client::{Client, FetchOptions, Isolation, Record, TopicPartition};
use spool_pipeline::topics;

/// A deal (book `product`, 30 % off) for hand-made deal-alert requests.
pub fn book_deal(product: &str) -> spool_pipeline::events::DealInfo {
    spool_pipeline::events::DealInfo {
        transition: format!("{product}:1"),
        product: product.to_owned(),
        name: "A book".into(),
        category: "books".into(),
        price: 700,
        reference: 1_000,
        drop_bp: 3_000,
        merchant: "m000".into(),
    }
}

/// A real `spoold` with the pipeline's topics (`partitions` each), a client, and its address.
pub async fn broker_with_topics(
    partitions: u32,
) -> (spool_testkit::Broker, spool_client::Client, String) {
    let broker = spool_testkit::Broker::start();
    let addr = broker.addr();
    let client = spool_client::Client::connect(addr.as_str()).await.unwrap();
    spool_pipeline::publish::ensure_topics(&client, Some(partitions))
        .await
        .unwrap();
    (broker, client, addr)
}

/// Each processor's group and the input topics it consumes.
pub const PROCESSOR_INPUTS: [(&str, &[&str]); 4] = [
    ("deals", &[topics::PRICES]),
    (
        "matching",
        &[
            topics::DEAL_BROADCAST,
            topics::USER_SETTINGS,
            topics::ADDRESS_STATUS,
        ],
    ),
    (
        "notifications",
        &[topics::NOTIFICATION_REQUESTS, topics::OUTGOING_MAIL],
    ),
    ("bounces", &[topics::POSTFIX_LOG]),
];

/// Every partition (`0..partitions`) of each of `inputs`.
pub fn input_partitions(inputs: &[&str], partitions: u32) -> Vec<TopicPartition> {
    inputs
        .iter()
        .flat_map(|t| (0..partitions).map(move |p| TopicPartition::new(*t, p)))
        .collect()
}

/// Asserts two sets are equal, reporting sizes and a few differences (not both sets).
pub fn assert_same_set<T: Ord + Debug + Clone>(what: &str, got: &BTreeSet<T>, want: &BTreeSet<T>) {
    if got == want {
        return;
    }
    let missing: Vec<_> = want.difference(got).take(5).collect();
    let extra: Vec<_> = got.difference(want).take(5).collect();
    panic!(
        "{what}: got {} want {}; missing {} (e.g. {missing:?}), unexpected {} (e.g. {extra:?})",
        got.len(),
        want.len(),
        want.difference(got).count(),
        got.difference(want).count()
    );
}

/// Flattens `address -> ids` into `(address, id)` pairs.
pub fn pairs(
    m: &std::collections::BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<(String, String)> {
    m.iter()
        .flat_map(|(a, ids)| ids.iter().map(move |i| (a.clone(), i.clone())))
        .collect()
}

/// A test's scratch directory (configs, state, the processors' logs, Postfix), kept and
/// printed when the test fails, removed otherwise.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    test: &'static str,
}

impl Scratch {
    /// A new temporary directory for the test named `test` (used in the message).
    pub fn new(test: &'static str) -> Scratch {
        Scratch {
            dir: Some(tempfile::tempdir().unwrap()),
            test,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("until dropped").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("{}: logs kept in {}", self.test, d.keep().display());
        }
    }
}

/// Every committed record of `topic` (partitions `0..partitions`) with its partition, read
/// committed from offset 0 to each partition's last stable offset.
pub async fn read_committed(client: &Client, partitions: u32, topic: &str) -> Vec<(u32, Record)> {
    let mut out = Vec::new();
    for p in 0..partitions {
        let mut offset = 0;
        loop {
            let f = client
                .fetch(
                    topic,
                    p,
                    offset,
                    &FetchOptions {
                        isolation: Isolation::ReadCommitted,
                        max_bytes: 4 << 20,
                        ..FetchOptions::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("fetching {topic}/{p}: {e}"));
            let next = f.next_offset;
            out.extend(f.records.into_iter().map(|r| (p, r)));
            if next <= offset || next >= f.last_stable_offset {
                break;
            }
            offset = next;
        }
    }
    out
}
