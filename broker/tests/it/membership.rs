//! Consumer-group membership against the real spoold, over raw gRPC: joins, revocation
//! before reassignment, fenced commits (zombies refused), session expiry and closed streams,
//! static members returning without a rebalance, group state across kill -9.

use std::time::{Duration, Instant};

use spool_proto::v1;
use spool_proto::v1::group_service_client::GroupServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

use crate::common::Spoold;

type Tp = (String, u32);

/// Test brokers accept session timeouts down to 100 ms.
const ENV: &[(&str, &str)] = &[("SPOOL_GROUPS__MIN_SESSION_TIMEOUT_MS", "100")];

struct Member {
    tx: mpsc::Sender<v1::MembershipRequest>,
    rx: Streaming<v1::MembershipResponse>,
    id: String,
    generation: u64,
    partitions: Vec<(String, u32)>,
}

fn join_req(
    group: &str,
    topics: &[&str],
    instance: Option<&str>,
    session_ms: u32,
) -> v1::JoinGroup {
    v1::JoinGroup {
        group: group.into(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        instance_id: instance.map(str::to_owned),
        member_id: String::new(),
        strategy: v1::AssignmentStrategy::Sticky as i32,
        session_timeout_ms: session_ms,
        rebalance_timeout_ms: 0,
    }
}

fn reason(s: &Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

impl Member {
    async fn join(b: &Spoold, join: v1::JoinGroup) -> Result<Member, Status> {
        Member::join_on(b.channel().await, join).await
    }

    /// [`Member::join`] over `channel`.
    async fn join_on(channel: Channel, join: v1::JoinGroup) -> Result<Member, Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(v1::MembershipRequest {
            request: Some(v1::membership_request::Request::Join(join)),
        })
        .await
        .unwrap();
        let mut stub = GroupServiceClient::new(channel);
        let mut rx = stub.membership(ReceiverStream::new(rx)).await?.into_inner();
        let first = rx.message().await?.expect("Joined");
        let Some(v1::membership_response::Response::Joined(j)) = first.response else {
            panic!("expected Joined, got {first:?}");
        };
        let mut m = Member {
            tx,
            rx,
            id: j.member_id,
            generation: 0,
            partitions: Vec::new(),
        };
        m.next_assignment(Duration::from_secs(5))
            .await
            .expect("a first assignment");
        Ok(m)
    }

    /// The next Assignment within `within` (heartbeat replies skipped); applied to `self`.
    async fn next_assignment(&mut self, within: Duration) -> Option<v1::Assignment> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .ok()?;
            match msg.expect("stream ok") {
                Some(v1::MembershipResponse {
                    response: Some(v1::membership_response::Response::Assignment(a)),
                }) => {
                    assert!(a.generation > self.generation, "generations go forward");
                    self.generation = a.generation;
                    self.partitions = a
                        .partitions
                        .iter()
                        .map(|tp| (tp.topic.clone(), tp.partition))
                        .collect();
                    return Some(a);
                }
                Some(_) => continue,
                None => panic!("stream ended"),
            }
        }
    }

    /// How the stream ends (skipping other messages).
    async fn end(&mut self, within: Duration) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => panic!("stream did not end within {within:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(s)) => return Err(s),
            }
        }
    }

    async fn send(&self, r: v1::membership_request::Request) {
        let _ = self
            .tx
            .send(v1::MembershipRequest { request: Some(r) })
            .await;
    }

    async fn ack(&self) {
        self.send(v1::membership_request::Request::Ack(v1::AssignmentAck {
            generation: self.generation,
        }))
        .await;
    }

    async fn heartbeat(&self) {
        self.send(v1::membership_request::Request::Heartbeat(
            v1::GroupHeartbeat {},
        ))
        .await;
    }
}

async fn topic(b: &Spoold, name: &str, partitions: u32) {
    b.create_topic(name, partitions).await;
}

fn commit(
    group: &str,
    member: &str,
    generation: u64,
    tp: &(String, u32),
    offset: u64,
) -> v1::CommitOffsetsRequest {
    v1::CommitOffsetsRequest {
        group: group.into(),
        offsets: vec![v1::OffsetCommit {
            topic: tp.0.clone(),
            partition: tp.1,
            offset,
            metadata: String::new(),
        }],
        member_id: member.into(),
        generation,
    }
}

async fn describe(b: &Spoold, group: &str) -> v1::DescribeGroupResponse {
    GroupServiceClient::new(b.channel().await)
        .describe_group(v1::DescribeGroupRequest {
            group: group.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_before_reassignment_and_fenced_commits() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 4).await;
    let mut offsets = b.offsets().await;

    let mut a = Member::join(&b, join_req("g", &["t"], None, 10_000))
        .await
        .unwrap();
    assert_eq!(a.partitions.len(), 4);
    a.ack().await;
    let ga1 = a.generation;
    // A plain commit and a DeleteGroup are refused while the group has members.
    let e = offsets
        .commit_offsets(commit("g", "", 0, &("t".into(), 0), 1))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "ERROR_CODE_GROUP_NOT_EMPTY"),
        "{e:?}"
    );
    let e = offsets
        .delete_group(v1::DeleteGroupRequest {
            group: "g".into(),
            topics: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ERROR_CODE_GROUP_NOT_EMPTY");
    for tp in a.partitions.clone() {
        offsets
            .commit_offsets(commit("g", &a.id, ga1, &tp, 10))
            .await
            .unwrap();
    }

    // b joins: two partitions are revoked from a; b gets nothing until a acknowledges.
    let mut bm = Member::join(&b, join_req("g", &["t"], None, 10_000))
        .await
        .unwrap();
    assert!(bm.partitions.is_empty(), "{:?}", bm.partitions);
    let before = a.partitions.clone();
    a.next_assignment(Duration::from_secs(5))
        .await
        .expect("revocation");
    assert_eq!(a.partitions.len(), 2);
    let revoked: Vec<(String, u32)> = before
        .into_iter()
        .filter(|tp| !a.partitions.contains(tp))
        .collect();
    assert_eq!(revoked.len(), 2);
    assert!(
        bm.next_assignment(Duration::from_millis(300))
            .await
            .is_none(),
        "granted before the revocation was acknowledged"
    );
    let d = describe(&b, "g").await;
    assert_eq!(d.state, v1::GroupState::Rebalancing as i32);
    // a commits what it gives up (it still owns it until it acknowledges)...
    for tp in &revoked {
        offsets
            .commit_offsets(commit("g", &a.id, a.generation, tp, 20))
            .await
            .unwrap();
    }
    // ...b cannot commit it yet.
    let e = offsets
        .commit_offsets(commit("g", &bm.id, bm.generation, &revoked[0], 99))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ERROR_CODE_ILLEGAL_GENERATION", "{e:?}");
    a.ack().await;
    bm.next_assignment(Duration::from_secs(5))
        .await
        .expect("grant after the ack");
    assert_eq!(bm.partitions, revoked);
    bm.ack().await;
    // a is now a zombie for those partitions: refused, with either generation.
    for g in [ga1, a.generation] {
        let e = offsets
            .commit_offsets(commit("g", &a.id, g, &revoked[0], 5))
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "ERROR_CODE_ILLEGAL_GENERATION", "{e:?}");
    }
    offsets
        .commit_offsets(commit("g", &bm.id, bm.generation, &revoked[0], 21))
        .await
        .unwrap();
    let got = offsets
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g".into(),
            partitions: vec![v1::TopicPartition {
                topic: revoked[0].0.clone(),
                partition: revoked[0].1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.offsets[0].offset, Some(21));

    tokio::time::sleep(Duration::from_millis(50)).await;
    let d = describe(&b, "g").await;
    assert_eq!(d.state, v1::GroupState::Stable as i32, "{d:?}");
    assert_eq!(d.members.len(), 2);
    assert!(
        d.members
            .iter()
            .all(|m| m.partitions.len() == 2 && m.connected)
    );
    assert!(d.unassigned.is_empty());
    assert_eq!(d.strategy, v1::AssignmentStrategy::Sticky as i32);

    // a leaves: the stream ends cleanly, b gets everything, a's id is fenced.
    a.send(v1::membership_request::Request::Leave(
        v1::LeaveMembership {},
    ))
    .await;
    a.end(Duration::from_secs(5))
        .await
        .expect("a clean end after leaving");
    bm.next_assignment(Duration::from_secs(5))
        .await
        .expect("a's partitions");
    assert_eq!(bm.partitions.len(), 4);
    let e = offsets
        .commit_offsets(commit("g", &a.id, a.generation, &a.partitions[0], 5))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "ERROR_CODE_FENCED_MEMBER")
    );

    // A join with another strategy is refused while the group has members.
    let mut other = join_req("g", &["t"], None, 10_000);
    other.strategy = v1::AssignmentStrategy::Range as i32;
    let e = Member::join(&b, other).await.err().expect("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Unknown topics too.
    let e = Member::join(&b, join_req("g", &["nope"], None, 10_000))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // LeaveGroup by member id; then the group is empty and plain commits work again.
    GroupServiceClient::new(b.channel().await)
        .leave_group(v1::LeaveGroupRequest {
            group: "g".into(),
            member_id: bm.id.clone(),
            instance_id: String::new(),
        })
        .await
        .unwrap();
    bm.end(Duration::from_secs(5))
        .await
        .expect("ended by LeaveGroup");
    let d = describe(&b, "g").await;
    assert_eq!(d.state, v1::GroupState::Empty as i32);
    assert!(d.generation >= 4);
    offsets
        .commit_offsets(commit("g", "", 0, &("t".into(), 0), 1))
        .await
        .unwrap();
    let metrics = Spoold::scrape_addr(&b.metrics_addr);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("spool_group_rebalances_total"))
        .expect(&metrics);
    assert!(!line.ends_with(" 0"), "{line}");
    assert!(metrics.contains("spool_group_rebalance_seconds_count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_closed_members_lose_their_partitions_within_the_session_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 2).await;
    let session = Duration::from_millis(600);
    let mut a = Member::join(&b, join_req("g", &["t"], None, 600))
        .await
        .unwrap();
    a.ack().await;
    let mut c = Member::join(&b, join_req("g", &["t"], None, 600))
        .await
        .unwrap();
    a.next_assignment(Duration::from_secs(5)).await.unwrap();
    a.ack().await;
    c.next_assignment(Duration::from_secs(5)).await.unwrap();
    c.ack().await;
    assert_eq!((a.partitions.len(), c.partitions.len()), (1, 1));

    // c goes silent (its stream stays open); a keeps heartbeating.
    let silent_since = Instant::now();
    let beat = async {
        loop {
            a.heartbeat().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let got = tokio::select! {
        () = beat => unreachable!(),
        r = async {
            // c is removed: its stream ends with FENCED_MEMBER.
            let e = c.end(Duration::from_secs(5)).await.unwrap_err();
            (e, silent_since.elapsed())
        } => r,
    };
    let (e, took) = got;
    assert_eq!(reason(&e), "ERROR_CODE_FENCED_MEMBER", "{e:?}");
    assert!(e.message().contains("session expired"), "{e:?}");
    assert!(
        took >= session - Duration::from_millis(50),
        "removed after {took:?}"
    );
    assert!(
        took <= session + Duration::from_millis(400),
        "removed after {took:?}, session {session:?}"
    );
    a.next_assignment(Duration::from_secs(2))
        .await
        .expect("c's partition");
    assert_eq!(a.partitions.len(), 2);
    a.ack().await;

    // A dynamic member whose stream closes leaves at once.
    let mut d = Member::join(&b, join_req("g", &["t"], None, 60_000))
        .await
        .unwrap();
    a.next_assignment(Duration::from_secs(2)).await.unwrap();
    a.ack().await;
    d.next_assignment(Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.partitions.len(), 1);
    d.ack().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let closed = Instant::now();
    drop(d);
    a.next_assignment(Duration::from_secs(2))
        .await
        .expect("d's partition after its stream closed");
    assert!(
        closed.elapsed() < Duration::from_secs(1),
        "{:?}",
        closed.elapsed()
    );
    assert_eq!(a.partitions.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_returns_without_a_rebalance_and_state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 4).await;
    let mut offsets = b.offsets().await;
    let mut s = Member::join(&b, join_req("g", &["t"], Some("host-1"), 2_000))
        .await
        .unwrap();
    s.ack().await;
    let mut d = Member::join(&b, join_req("g", &["t"], None, 10_000))
        .await
        .unwrap();
    s.next_assignment(Duration::from_secs(5)).await.unwrap();
    s.ack().await;
    d.next_assignment(Duration::from_secs(5)).await.unwrap();
    d.ack().await;
    let s_parts = s.partitions.clone();
    let d_parts = d.partitions.clone();
    assert_eq!((s_parts.len(), d_parts.len()), (2, 2));
    let old_s = s.id.clone();
    offsets
        .commit_offsets(commit("g", &s.id, s.generation, &s_parts[0], 7))
        .await
        .unwrap();

    // The static member's process dies (stream closed): it keeps its partitions, disconnected.
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let desc = describe(&b, "g").await;
    let sm = desc
        .members
        .iter()
        .find(|m| m.instance_id.as_deref() == Some("host-1"))
        .unwrap();
    assert!(!sm.connected);
    assert_eq!(sm.partitions.len(), 2);
    // It comes back within its session: same partitions, new member id; d hears nothing.
    let mut s2 = Member::join(&b, join_req("g", &["t"], Some("host-1"), 2_000))
        .await
        .unwrap();
    assert_ne!(s2.id, old_s);
    assert_eq!(s2.partitions, s_parts);
    s2.ack().await;
    assert!(
        d.next_assignment(Duration::from_millis(500))
            .await
            .is_none(),
        "the other member was rebalanced"
    );
    // The old incarnation is fenced.
    let e = offsets
        .commit_offsets(commit("g", &old_s, 99, &s_parts[0], 1))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ERROR_CODE_FENCED_MEMBER");
    // A second process with the same instance id replaces (fences) the running one, which
    // is told so by its own code (it must stop, not rejoin as an expired member would).
    let s3 = Member::join(&b, join_req("g", &["t"], Some("host-1"), 2_000))
        .await
        .unwrap();
    let e = s2.end(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "ERROR_CODE_MEMBER_REPLACED", "{e:?}");
    assert_eq!(s3.partitions, s_parts);
    s3.ack().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = describe(&b, "g").await;
    assert_eq!(before.state, v1::GroupState::Stable as i32, "{before:?}");

    // kill -9: the group comes back with both members disconnected and their assignments.
    b.kill();
    drop(d);
    drop(s3);
    let b = Spoold::start_env(dir.path(), &[], ENV);
    let after = describe(&b, "g").await;
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.members.len(), 2);
    assert!(after.members.iter().all(|m| !m.connected));
    let parts = |r: &v1::DescribeGroupResponse| {
        let mut v: Vec<(Option<String>, Vec<Tp>)> = r
            .members
            .iter()
            .map(|m| {
                (
                    m.instance_id.clone(),
                    m.partitions
                        .iter()
                        .map(|tp| (tp.topic.clone(), tp.partition))
                        .collect(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(parts(&after), parts(&before));
    let d_id = before
        .members
        .iter()
        .find(|m| m.instance_id.is_none())
        .unwrap()
        .member_id
        .clone();
    // Members rejoin: the static one by instance id, the dynamic one by its member id.
    let mut s4 = Member::join(&b, join_req("g", &["t"], Some("host-1"), 2_000))
        .await
        .unwrap();
    assert_eq!(s4.partitions, s_parts);
    let mut dj = join_req("g", &["t"], None, 10_000);
    dj.member_id = d_id;
    let mut d2 = Member::join(&b, dj).await.unwrap();
    assert_eq!(d2.partitions, d_parts);
    s4.ack().await;
    d2.ack().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let d = describe(&b, "g").await;
    assert_eq!(d.state, v1::GroupState::Stable as i32, "{d:?}");
    assert!(d.generation > before.generation);
    assert!(d.members.iter().all(|m| m.connected));
    let _ = (&mut s4, &mut d2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_members_that_do_not_return_expire() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 2).await;
    let m = Member::join(&b, join_req("g", &["t"], None, 500))
        .await
        .unwrap();
    m.ack().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.kill();
    drop(m);
    let b = Spoold::start_env(dir.path(), &[], ENV);
    let restored = Instant::now();
    assert_eq!(describe(&b, "g").await.members.len(), 1);
    loop {
        let d = describe(&b, "g").await;
        if d.members.is_empty() {
            assert_eq!(d.state, v1::GroupState::Empty as i32);
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(3),
            "restored member never expired: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once expired, plain commits work again.
    b.offsets()
        .await
        .commit_offsets(commit("g", "", 0, &("t".into(), 0), 1))
        .await
        .unwrap();
}

/// A member that does not read its stream, whose stream the broker therefore ends when an
/// Assignment does not fit in it, is disconnected at once (a dynamic member leaves): the
/// group rebalances without waiting for its revocation until the rebalance timeout (60 s
/// here), and its heartbeats, still arriving on its request side, do not keep it. If the
/// client reads its backlog later, the stream ends with FENCED_MEMBER. (Before: the member
/// stayed, and the joiner waited for the rebalance timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_stream_overflows_is_disconnected_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 2).await;
    // A small HTTP/2 window on the slow member's connection: the broker can send it only
    // about 150 heartbeat replies before the rest queue in its stream's channel.
    let slow = Channel::from_shared(b.url())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut a = Member::join_on(
        slow,
        v1::JoinGroup {
            rebalance_timeout_ms: 60_000,
            ..join_req("g", &["t"], None, 60_000)
        },
    )
    .await
    .unwrap();
    a.ack().await;
    assert_eq!(a.partitions.len(), 2);
    // a heartbeats without reading its stream: the replies fill the window, then the channel
    // (64 messages), then are dropped.
    for _ in 0..2000 {
        a.heartbeat().await;
    }
    // Let the group's task handle them (each takes microseconds).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(describe(&b, "g").await.members.len(), 1);

    // c joins: a is told to revoke a partition, which its full stream cannot take.
    let joined = Instant::now();
    let mut c = Member::join(&b, join_req("g", &["t"], None, 60_000))
        .await
        .unwrap();
    while c.partitions.len() < 2 {
        c.next_assignment(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "c has {:?} after {:?}: a was not disconnected",
                    c.partitions,
                    joined.elapsed()
                )
            });
    }
    let took = joined.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    let d = describe(&b, "g").await;
    assert_eq!(d.members.len(), 1, "{d:?}");
    assert_eq!(d.members[0].member_id, c.id);
    // a's heartbeats do not bring it back.
    a.heartbeat().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(describe(&b, "g").await.members.len(), 1);
    // a reads its backlog: its stream ends with why.
    let e = a.end(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(reason(&e), "ERROR_CODE_FENCED_MEMBER", "{e:?}");
    assert!(e.message().contains("fell 64 messages behind"), "{e:?}");
}

/// A group whose state append panics on the blocking pool (a bug, or the task cancelled)
/// ends its members' streams with INTERNAL and its ErrorInfo, not INVALID_ARGUMENT; so does
/// a fenced commit whose append panics (the plain commit path already said INTERNAL). The
/// panics come from the broker's `SPOOL_FAILPOINTS` panic points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_persisting_is_internal_not_a_bad_request() {
    // The second group-state append panics: a's join is the first, c's the second.
    let dir = tempfile::tempdir().unwrap();
    let env = [ENV[0], ("SPOOL_FAILPOINTS", "group-persist@2")];
    let b = Spoold::start_env(dir.path(), &[], &env);
    topic(&b, "t", 2).await;
    let mut a = Member::join(&b, join_req("g", &["t"], None, 60_000))
        .await
        .unwrap();
    // The joiner whose join could not be made durable is told INTERNAL too (it was told
    // "the broker is shutting down").
    let c = Member::join(&b, join_req("g", &["t"], None, 60_000)).await;
    let e = c.err().expect("c's join failed");
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(reason(&e), "ERROR_CODE_INTERNAL", "{e:?}");
    let e = a.end(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(reason(&e), "ERROR_CODE_INTERNAL", "{e:?}");
    assert!(
        !e.message().contains("failpoint"),
        "the panic stays in the log: {e:?}"
    );
    drop(b);

    // Every fenced commit's append panics.
    let dir = tempfile::tempdir().unwrap();
    let env = [ENV[0], ("SPOOL_FAILPOINTS", "group-commit")];
    let b = Spoold::start_env(dir.path(), &[], &env);
    topic(&b, "t", 2).await;
    let a = Member::join(&b, join_req("g", &["t"], None, 60_000))
        .await
        .unwrap();
    a.ack().await;
    let tp = a.partitions[0].clone();
    let e = b
        .offsets()
        .await
        .commit_offsets(commit("g", &a.id, a.generation, &tp, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(reason(&e), "ERROR_CODE_INTERNAL", "{e:?}");
    // The group and the broker go on: a is still its member.
    assert_eq!(describe(&b, "g").await.members.len(), 1);
    a.heartbeat().await;
    drop(a);
}

/// A static member replaced by a newer one with its instance id learns it (MEMBER_REPLACED)
/// even when its stream is full, once it reads its backlog; before, the status was dropped
/// and the stream ended cleanly, so the old client would rejoin and take the instance back
/// (the two flapping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_member_with_a_full_stream_still_learns_it_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], ENV);
    topic(&b, "t", 2).await;
    let slow = Channel::from_shared(b.url())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut a = Member::join_on(slow, join_req("g", &["t"], Some("i"), 60_000))
        .await
        .unwrap();
    a.ack().await;
    for _ in 0..2000 {
        a.heartbeat().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _newer = Member::join(&b, join_req("g", &["t"], Some("i"), 60_000))
        .await
        .unwrap();
    let e = a.end(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(reason(&e), "ERROR_CODE_MEMBER_REPLACED", "{e:?}");
}
