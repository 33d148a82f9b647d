//! `spool tail`/`consume` isolation and `spool txn list` against a real spoold: read
//! committed by default (aborted records hidden, `:end` stops at the last stable offset even
//! while a transaction is open), `--isolation uncommitted` shows everything, and the open
//! transaction is listed.

mod common;

use common::{Broker, spool};
use spool_client::{ProducerRecord, TransactionalConfig, TransactionalProducer};

#[test]
fn isolation_levels_and_the_transaction_listing() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    spool(&b, &["produce", "t/0", "p0"]).ok();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut open = rt.block_on(async {
        let c = b.client().await;
        let mut aborted = TransactionalProducer::new(c.clone(), TransactionalConfig::new("tx-a"))
            .await
            .unwrap();
        aborted.begin().unwrap();
        aborted
            .send("t", 0, ProducerRecord::new("aborted"))
            .await
            .unwrap();
        aborted.flush().await.unwrap();
        aborted.abort().await.unwrap();
        let mut open = TransactionalProducer::new(c, TransactionalConfig::new("tx-b"))
            .await
            .unwrap();
        open.begin().unwrap();
        open.send("t", 0, ProducerRecord::new("open"))
            .await
            .unwrap();
        open.flush().await.unwrap();
        open
    });
    let committed = spool(&b, &["consume", "t", "-o", "start:end", "-q"]).ok();
    assert_eq!(committed, "p0\n", "`:end` is the last stable offset");
    let all = spool(
        &b,
        &[
            "consume",
            "t",
            "-o",
            "start:end",
            "-q",
            "--isolation",
            "uncommitted",
        ],
    )
    .ok();
    assert_eq!(all, "p0\naborted\nopen\n");

    let listed = spool(&b, &["txn", "list", "--open"]).ok();
    assert!(
        listed.contains("tx-b") && listed.contains("ongoing"),
        "{listed}"
    );
    assert!(!listed.contains("tx-a"), "{listed}");
    let json = spool(&b, &["txn", "list", "--json"]).ok();
    assert_eq!(json.lines().count(), 2, "{json}");
    assert!(json.contains(r#""partitions":["t/0"]"#), "{json}");

    rt.block_on(open.commit()).unwrap();
    // The commit's marker becomes durable (and the record visible) just after the reply.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let committed = spool(&b, &["consume", "t", "-o", "start:end", "-q"]).ok();
        if committed == "p0\nopen\n" || std::time::Instant::now() > deadline {
            assert_eq!(committed, "p0\nopen\n");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
