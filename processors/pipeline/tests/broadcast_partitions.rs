//! The broadcast partition counts (`[app] broadcast_partitions` of deals, `address_partitions`
//! of bounces and notifications) on a real `spoold`: the count used is the topic's, read at start; a setting
//! that disagrees with the topic (or a topic that does not exist) stops the start with a
//! message naming both, instead of starving matching's other partitions (too few copies) or
//! dead-lettering price updates (too many).

mod support;

use std::time::{Duration, Instant};

use spool_pipeline::processors::{PartitionsError, resolve_broadcast_partitions};
use spool_pipeline::topics;
use support::procs::Processor;

/// Waits for `p` to exit by itself, with the status the systemd unit does not restart
/// (misconfigured); its log so far.
fn refused(p: &mut Processor) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = p.exited() {
            assert_eq!(
                status.code(),
                Some(spool_processor::app::MISCONFIGURED_EXIT_CODE),
                "{}: {}",
                p.name,
                p.log_since_start()
            );
            return p.log_since_start();
        }
        assert!(
            Instant::now() < deadline,
            "{} still running after 30 s: {}",
            p.name,
            p.log_since_start()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_count_other_than_the_topics_refuses_to_start() {
    // Matching's inputs at 3 partitions.
    let (_broker, client, addr) = support::broker_with_topics(3).await;

    // The library check.
    let got = |configured| {
        resolve_broadcast_partitions(
            &client,
            topics::DEAL_BROADCAST,
            "broadcast_partitions",
            configured,
        )
    };
    assert_eq!(got(0).await.unwrap(), 3, "0 takes the topic's count");
    assert_eq!(got(3).await.unwrap(), 3);
    let e = got(2).await.unwrap_err();
    assert!(
        matches!(
            e,
            PartitionsError::Mismatch {
                configured: 2,
                actual: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let missing = resolve_broadcast_partitions(&client, "no-such-topic", "broadcast_partitions", 0)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, PartitionsError::Missing { .. }),
        "{missing:?}"
    );

    // The binaries: a mismatch stops the start with the message; 0 or the right count runs.
    let dir = tempfile::tempdir().unwrap();
    let deals = |name: &str, n: u32| {
        Processor::new(
            env!("CARGO_BIN_EXE_spool-deals"),
            dir.path(),
            name,
            &addr,
            &format!(
                "inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n[app]\nbroadcast_partitions = {n}\n"
            ),
        )
    };
    let mut wrong = deals("deals-wrong", 2);
    wrong.start();
    let log = refused(&mut wrong);
    assert!(
        log.contains("deal-broadcast has 3 partitions but [app] broadcast_partitions = 2"),
        "{log}"
    );
    for (name, n) in [("deals-auto", 0), ("deals-right", 3)] {
        let mut p = deals(name, n);
        p.start();
        assert!(
            p.wait_ready(Duration::from_secs(30)),
            "{name} not ready: {}",
            p.log_since_start()
        );
        p.kill();
    }

    let mut bounces = Processor::new(
        env!("CARGO_BIN_EXE_spool-bounces"),
        dir.path(),
        "bounces",
        &addr,
        "inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n[app]\naddress_partitions = 4\n",
    );
    bounces.start();
    let log = refused(&mut bounces);
    assert!(
        log.contains("address-status has 3 partitions but [app] address_partitions = 4"),
        "{log}"
    );
    // Notifications flags addresses refused at SMTP time on address-status too.
    let mut notifications = Processor::new(
        env!("CARGO_BIN_EXE_spool-notifications"),
        dir.path(),
        "notifications",
        &addr,
        "inputs = [\"notification-requests\", \"outgoing-mail\"]\noutputs = [\"outgoing-mail\", \"mail-status\", \"address-status\"]\n[app]\naddress_partitions = 2\n",
    );
    notifications.start();
    let log = refused(&mut notifications);
    assert!(
        log.contains("address-status has 3 partitions but [app] address_partitions = 2"),
        "{log}"
    );
}
