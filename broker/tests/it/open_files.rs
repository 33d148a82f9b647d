//! A topic with more partitions than the broker's open-files limit can hold (issue 12): the
//! real spoold under a low `RLIMIT_NOFILE` refuses it up front with RESOURCE_EXHAUSTED and a
//! message that says how many descriptors it needs and how many are free, leaves nothing on
//! disk, and goes on working: describe and delete say NOT_FOUND, the same create is refused
//! the same way, a smaller one works, and the broker restarts.

use spool_proto::v1;
use spool_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::common::Spoold;

/// The limit spoold runs under: enough for the broker itself and a small topic.
const NOFILE: u64 = 256;
/// More partitions than `NOFILE` descriptors can hold.
const WIDE: u32 = 3000;

fn create(topic: &str, partitions: u32) -> v1::CreateTopicRequest {
    v1::CreateTopicRequest {
        topic: topic.into(),
        partitions,
        config: None,
    }
}

/// How many partitions DescribeTopic reports.
async fn partitions(admin: &mut AdminServiceClient<Channel>, topic: &str) -> usize {
    admin
        .describe_topic(v1::DescribeTopicRequest {
            topic: topic.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .partitions
        .len()
}

/// Entries of the data directory whose names start with a dot, but the lock.
fn hidden_entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect()
}

// Multi-threaded, so that dropped connections close while the test waits for spoold to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_open_files_limit_cannot_hold_is_refused_cleanly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_with_open_files(dir.path(), &[], NOFILE);
    let mut admin = b.admin().await;

    for attempt in 0..2 {
        let err = admin.create_topic(create("wide", WIDE)).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::ResourceExhausted,
            "attempt {attempt}: {err:?}"
        );
        let msg = err.message();
        assert!(
            msg.contains(&format!("{WIDE} partition(s)"))
                && msg.contains(&format!("open-files limit {NOFILE}"))
                && msg.contains("needs 6064 file descriptors"),
            "attempt {attempt}: {msg}"
        );
        let info = err.get_details_error_info().expect("an ErrorInfo detail");
        assert_eq!(info.reason, "ERROR_CODE_OPEN_FILES_LIMIT");

        let err = admin
            .describe_topic(v1::DescribeTopicRequest {
                topic: "wide".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "describe: {err:?}");
        let err = admin
            .delete_topic(v1::DeleteTopicRequest {
                topic: "wide".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "delete: {err:?}");
        assert_eq!(hidden_entries(dir.path()), Vec::<String>::new());
        assert!(
            !dir.path().join("wide").exists(),
            "no topic directory is left behind"
        );
    }

    // A count that fits works under the same name.
    admin.create_topic(create("wide", 20)).await.unwrap();
    assert_eq!(partitions(&mut admin, "wide").await, 20);
    drop(admin);
    b.stop();

    // And the broker starts again under the same limit.
    let b = Spoold::start_with_open_files(dir.path(), &[], NOFILE);
    let mut admin = b.admin().await;
    assert_eq!(partitions(&mut admin, "wide").await, 20);
    let err = admin.create_topic(create("wider", WIDE)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(admin);
    b.stop();
}

/// spoold raises its soft open-files limit to the hard one at start, so a low soft default
/// does not cap a broker whose hard limit allows more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_files_limit_is_raised_to_the_hard_one_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_with_soft_open_files(dir.path(), NOFILE);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    // "Max open files  <soft>  <hard>  files"
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    let hard_n: u64 = hard.parse().expect("a finite hard limit on this machine");
    assert!(
        hard_n > NOFILE,
        "the test needs a hard limit above {NOFILE}: {line}"
    );
    assert_eq!(soft, hard, "soft limit raised to the hard one: {line}");
    assert_eq!(b.metric::<f64>("process_max_fds"), hard_n as f64);
}
