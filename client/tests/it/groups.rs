//! Consumer-group administration through the client: `list_groups` and `delete_group` with
//! their typed results and errors, and a deletion surviving a broker restart.

use spool_client::{Error, GroupDeletion, OffsetCommit};

use crate::broker::Broker;
use crate::create;

fn at(topic: &str, partition: u32, offset: u64) -> OffsetCommit {
    OffsetCommit {
        topic: topic.into(),
        partition,
        offset,
        metadata: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_delete_groups() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "orders", 2).await;
    create(&c, "prices", 1).await;
    assert!(c.list_groups().await.unwrap().is_empty());

    c.commit_offsets("billing", &[at("orders", 0, 3), at("prices", 0, 4)])
        .await
        .unwrap();
    c.commit_offsets("audit", &[at("orders", 1, 1)])
        .await
        .unwrap();
    let groups = c.list_groups().await.unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].group, "audit");
    assert_eq!(
        (groups[1].group.as_str(), groups[1].partitions),
        ("billing", 2)
    );
    assert_eq!(groups[1].topics, ["orders", "prices"]);
    assert!(groups[1].last_commit_time_ms > 0);

    let d = c.delete_group("billing", &["prices".into()]).await.unwrap();
    assert_eq!(
        d,
        GroupDeletion {
            group: "billing".into(),
            partitions_deleted: 1
        }
    );
    let e = c
        .delete_group("billing", &["prices".into()])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownGroup { group, .. } if group == "billing"),
        "{e:?}"
    );
    let e = c.delete_group("nobody", &[]).await.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownGroup { group, .. } if group == "nobody"),
        "{e:?}"
    );
    assert_eq!(
        c.delete_group("audit", &[])
            .await
            .unwrap()
            .partitions_deleted,
        1
    );

    broker.restart();
    let c = broker.client().await;
    let groups = c.list_groups().await.unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(
        (groups[0].group.as_str(), groups[0].partitions),
        ("billing", 1)
    );
    let left = c.fetch_offsets("billing", &[]).await.unwrap();
    assert_eq!(
        (left[0].topic.as_str(), left[0].offset),
        ("orders", Some(3))
    );
}
