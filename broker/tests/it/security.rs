//! TLS and bearer tokens with ACLs, against the real spoold: a certificate made for the test,
//! tokens configured by hash, and each kind of refusal.

use std::path::Path;

use spool_proto::v1;
use spool_proto::v1::admin_service_client::AdminServiceClient;
use spool_proto::v1::produce_service_client::ProduceServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::common::{Spoold, record};

const ADMIN: &str = "admin-token-0123456789abcdef";
const DEALS: &str = "deals-token-0123456789abcdef";

fn write_config(dir: &Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("server.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), ck.signing_key.serialize_pem()).unwrap();
    let hash = |t: &str| spool_broker::hash_token(t);
    let cfg = format!(
        r#"
[tls]
cert = "{crt}"
key = "{key}"

[[auth.tokens]]
name = "ops"
sha256 = "{admin}"
admin = ["*"]
consume = ["*"]
produce = ["*"]
groups = ["*"]

[[auth.tokens]]
name = "deals"
sha256 = "{deals}"
produce = ["deals."]
consume = ["prices"]
groups = ["deals-"]
"#,
        crt = dir.join("server.crt").display(),
        key = dir.join("server.key").display(),
        admin = hash(ADMIN),
        deals = hash(DEALS),
    );
    std::fs::write(dir.join("spoold.toml"), cfg).unwrap();
    ck.cert.pem().into_bytes()
}

#[derive(Clone)]
struct Bearer(Option<&'static str>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0 {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

async fn tls_channel(b: &Spoold, ca: &[u8]) -> Channel {
    let port = b.addr.rsplit(':').next().unwrap();
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_acls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_config(dir.path());
    let cfg = dir.path().join("spoold.toml");
    let b = Spoold::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let ch = tls_channel(&b, &ca).await;

    let admin = |t| AdminServiceClient::with_interceptor(ch.clone(), Bearer(t));
    // No token, unknown token: unauthenticated.
    for t in [None, Some("not-a-token")] {
        let err = admin(t)
            .list_topics(v1::ListTopicsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{t:?}");
    }
    // The ops token administers everything.
    for topic in ["deals.fr", "prices", "secret"] {
        admin(Some(ADMIN))
            .create_topic(v1::CreateTopicRequest {
                topic: topic.into(),
                partitions: 1,
                config: None,
            })
            .await
            .unwrap();
    }
    // The deals token may not create topics, and sees only what it may describe: what it may
    // produce to or consume from (as Kafka's WRITE and READ imply DESCRIBE).
    let err = admin(Some(DEALS))
        .create_topic(v1::CreateTopicRequest {
            topic: "deals.de".into(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let seen: Vec<_> = admin(Some(DEALS))
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.topic)
        .collect();
    assert_eq!(seen, vec!["deals.fr", "prices"]);
    // Produce rights on deals.* imply describing deals.fr (the producer looks it up first).
    let d = admin(Some(DEALS))
        .describe_topic(v1::DescribeTopicRequest {
            topic: "deals.fr".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions.len(), 1);
    let err = admin(Some(DEALS))
        .describe_topic(v1::DescribeTopicRequest {
            topic: "secret".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("may not describe \"secret\"")
            && err.message().contains("needs produce, consume or admin"),
        "the refusal names the permission that is missing: {}",
        err.message()
    );

    // Produce: allowed on deals.*, refused per partition elsewhere.
    let mut prod = ProduceServiceClient::with_interceptor(ch.clone(), Bearer(Some(DEALS)));
    let part = |topic: &str| v1::PartitionProduce {
        topic: topic.into(),
        partition: 0,
        data: Some(v1::partition_produce::Data::Records(v1::RecordList {
            records: vec![record(None, "x")],
            compression: 0,
        })),
    };
    let r = prod
        .produce(v1::ProduceRequest {
            partitions: vec![part("deals.fr"), part("prices")],
            acks: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_none(), "{r:?}");
    assert_eq!(
        r.results[1].error.as_ref().unwrap().code,
        v1::ErrorCode::NotAuthorized as i32
    );

    // Groups: its own prefix only.
    let mut off = v1::offset_service_client::OffsetServiceClient::with_interceptor(
        ch.clone(),
        Bearer(Some(DEALS)),
    );
    let commit = |group: &str, topic: &str| v1::CommitOffsetsRequest {
        group: group.into(),
        offsets: vec![v1::OffsetCommit {
            topic: topic.into(),
            partition: 0,
            offset: 1,
            metadata: String::new(),
        }],
        ..Default::default()
    };
    off.commit_offsets(commit("deals-matcher", "prices"))
        .await
        .unwrap();
    assert_eq!(
        off.commit_offsets(commit("other", "prices"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        off.commit_offsets(commit("deals-matcher", "secret"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Health stays open without a token (load balancers).
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    // A plaintext client cannot talk to the TLS listener.
    let plain = Channel::from_shared(b.url()).unwrap().connect().await;
    if let Ok(plain) = plain {
        let err = AdminServiceClient::new(plain)
            .list_topics(v1::ListTopicsRequest {})
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
    b.stop();
}

#[test]
fn non_loopback_is_allowed_with_tls_and_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let cfg = dir.path().join("spoold.toml");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spoold"))
            .args([
                "--print-config",
                "--listen",
                "0.0.0.0:7170",
                "--metrics-listen",
                "off",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(
        !run(&[]).status.success(),
        "plaintext and no tokens: refused"
    );
    assert!(
        run(&["--config", cfg.to_str().unwrap()]).status.success(),
        "TLS and tokens: allowed"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoold"))
        .arg("--hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("{ADMIN}\n").as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        spool_broker::hash_token(ADMIN)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_admin_follows_the_acls() {
    use v1::offset_service_client::OffsetServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_config(dir.path());
    let cfg = dir.path().join("spoold.toml");
    let b = Spoold::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let ch = tls_channel(&b, &ca).await;
    let admin = AdminServiceClient::with_interceptor(ch.clone(), Bearer(Some(ADMIN)));
    for topic in ["prices", "secret"] {
        admin
            .clone()
            .create_topic(v1::CreateTopicRequest {
                topic: topic.into(),
                partitions: 1,
                config: None,
            })
            .await
            .unwrap();
    }
    let ops = OffsetServiceClient::with_interceptor(ch.clone(), Bearer(Some(ADMIN)));
    let deals = OffsetServiceClient::with_interceptor(ch.clone(), Bearer(Some(DEALS)));
    let commit = |group: &str, topic: &str| v1::CommitOffsetsRequest {
        group: group.into(),
        offsets: vec![v1::OffsetCommit {
            topic: topic.into(),
            partition: 0,
            offset: 1,
            metadata: String::new(),
        }],
        ..Default::default()
    };
    for (group, topic) in [
        ("deals-matcher", "prices"),
        ("deals-matcher", "secret"),
        ("deals-pricer", "prices"),
        ("other", "prices"),
    ] {
        ops.clone()
            .commit_offsets(commit(group, topic))
            .await
            .unwrap();
    }
    let names = |mut c: OffsetServiceClient<_>| async move {
        c.list_groups(v1::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups
            .into_iter()
            .map(|g| g.group)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(ops.clone()).await,
        ["deals-matcher", "deals-pricer", "other"]
    );
    assert_eq!(
        names(deals.clone()).await,
        ["deals-matcher", "deals-pricer"],
        "only the groups the token may use"
    );
    let no_token = OffsetServiceClient::with_interceptor(ch.clone(), Bearer(None));
    assert_eq!(
        no_token
            .clone()
            .list_groups(v1::ListGroupsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let delete = |group: &str, topics: &[&str]| v1::DeleteGroupRequest {
        group: group.into(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
    };
    // Another prefix's group, and a topic the token may not consume: refused, nothing deleted.
    for req in [delete("other", &[]), delete("deals-matcher", &["secret"])] {
        let err = deals.clone().delete_group(req).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    // Its own group's topic, then its whole group (the group ACL alone suffices).
    let r = deals
        .clone()
        .delete_group(delete("deals-matcher", &["prices"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.partitions_deleted, 1);
    let r = deals
        .clone()
        .delete_group(delete("deals-matcher", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.partitions_deleted, 1, "the secret partition");
    assert_eq!(names(ops.clone()).await, ["deals-pricer", "other"]);
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_follows_the_acls() {
    use v1::group_service_client::GroupServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_config(dir.path());
    let cfg = dir.path().join("spoold.toml");
    let b = Spoold::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let ch = tls_channel(&b, &ca).await;
    let admin = AdminServiceClient::with_interceptor(ch.clone(), Bearer(Some(ADMIN)));
    for topic in ["prices", "secret"] {
        admin
            .clone()
            .create_topic(v1::CreateTopicRequest {
                topic: topic.into(),
                partitions: 1,
                config: None,
            })
            .await
            .unwrap();
    }
    let deals = GroupServiceClient::with_interceptor(ch.clone(), Bearer(Some(DEALS)));
    let join = |group: &str, topic: &str| {
        let msg = v1::MembershipRequest {
            request: Some(v1::membership_request::Request::Join(v1::JoinGroup {
                group: group.into(),
                topics: vec![topic.into()],
                ..Default::default()
            })),
        };
        tokio_stream::iter(vec![msg]).chain(tokio_stream::pending())
    };
    use tokio_stream::StreamExt;
    // The token's groups ("deals-") and topics ("prices"): allowed.
    let mut ok = deals
        .clone()
        .membership(join("deals-matcher", "prices"))
        .await
        .unwrap()
        .into_inner();
    let first = ok.message().await.unwrap().unwrap();
    assert!(matches!(
        first.response,
        Some(v1::membership_response::Response::Joined(_))
    ));
    // Another group, or a topic it may not consume: refused before anything happens.
    for (group, topic) in [("other", "prices"), ("deals-matcher", "secret")] {
        let e = deals
            .clone()
            .membership(join(group, topic))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{group} {topic}: {e:?}");
    }
    let describe = |g: &str| v1::DescribeGroupRequest { group: g.into() };
    let d = deals
        .clone()
        .describe_group(describe("deals-matcher"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.members.len(), 1);
    let e = deals
        .clone()
        .describe_group(describe("other"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = deals
        .clone()
        .leave_group(v1::LeaveGroupRequest {
            group: "other".into(),
            member_id: "x".into(),
            instance_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Without a token: unauthenticated.
    let anon = GroupServiceClient::with_interceptor(ch, Bearer(None));
    let e = anon
        .clone()
        .describe_group(describe("deals-matcher"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}
