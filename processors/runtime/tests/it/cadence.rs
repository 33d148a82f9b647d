//! Commit cadence: a trickle of inputs is committed as soon as the input goes idle (the
//! linger, `[commit] linger_ms`), not when the interval is up. With `interval_ms = 60000`,
//! each of a few single records must be readable downstream (read committed) long before a
//! minute; the control, `linger_ms = interval_ms` (commit on the interval only, the old
//! cadence), shows the same records are then not readable for seconds, so it is the linger
//! that committed them.

use std::time::Duration;

use spool_client::{ConsumerConfig, ProducerConfig, StartAt};
use spool_testkit::Broker;

use crate::{Proc, create, produce_inputs, write_config};

/// Far above a commit on a loaded CI machine, far below the 60 s interval.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);
/// How long the control waits to see that nothing is readable before the interval.
const CONTROL_WAIT: Duration = Duration::from_secs(3);

fn config(dir: &std::path::Path, name: &str, output: &str, linger: &str) -> std::path::PathBuf {
    write_config(
        dir,
        name,
        &format!(
            "name = \"{name}\"\ninputs = [\"in\"]\noutputs = [\"{output}\"]\n\
             [commit]\ninterval_ms = 60000\n{linger}\n[app]\noutput = \"{output}\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_commits_when_the_input_goes_idle_not_on_the_interval() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 1).await;
    create(&c, "out", 1).await;
    create(&c, "out-interval", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // Default linger: each record is readable downstream well before the interval.
    let cfg = config(dir.path(), "lingering", "out", "");
    let mut p = Proc::passthrough(&cfg, &broker.addr(), "p0", &state);
    assert!(p.wait_ready(Duration::from_secs(30)), "never ready");
    let mut out = c.consumer(ConsumerConfig::default());
    out.subscribe_topic("out", StartAt::Earliest).await.unwrap();
    let mut produced = Vec::new();
    for i in 0..5 {
        produce_inputs(&c, ProducerConfig::default(), 1, 1, &mut produced).await;
        let r = tokio::time::timeout(VISIBLE_WITHIN, out.next())
            .await
            .unwrap_or_else(|_| panic!("record {i} not committed within {VISIBLE_WITHIN:?}"))
            .expect("stream open")
            .expect("record");
        let want = format!("{}|{}", produced[i].1, i + 1);
        assert_eq!(r.value.as_deref(), Some(want.as_bytes()), "record {i}");
    }
    assert!(
        tokio::task::block_in_place(|| p.terminate(Duration::from_secs(30))),
        "clean stop"
    );

    // Control: linger = interval (commit on the interval only). The same five inputs, read
    // by another group, stay invisible downstream while the transaction waits.
    let cfg = config(dir.path(), "interval", "out-interval", "linger_ms = 60000");
    let _p = Proc::passthrough(&cfg, &broker.addr(), "p0", &state);
    assert!(_p.wait_ready(Duration::from_secs(30)), "never ready");
    let mut out = c.consumer(ConsumerConfig::default());
    out.subscribe_topic("out-interval", StartAt::Earliest)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(CONTROL_WAIT, out.next())
            .await
            .is_err(),
        "with linger = interval nothing may be committed before the interval"
    );
}
