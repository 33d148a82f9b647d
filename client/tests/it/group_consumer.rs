//! `GroupConsumer` against the real spoold: partitions shared and handed over with commits
//! (no record lost or repeated in a clean hand-over), static members returning, zombies
//! refused with typed errors, and members rejoining after a broker restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_client::{
    AssignmentStrategy, Client, Error, GroupConfig, GroupConsumer, GroupState, OffsetCommit,
    TopicPartition,
};

use crate::broker::Broker;
use crate::{create, produce_n};

const WAIT: Duration = Duration::from_secs(10);

fn broker() -> Broker {
    Broker::start_with_config(|_| Some("[groups]\nmin_session_timeout_ms = 100\n".into()))
}

fn config(instance: Option<&str>) -> GroupConfig {
    let c = GroupConfig::new("g", ["ev"]).session_timeout(Duration::from_secs(2));
    match instance {
        Some(i) => c.instance_id(i),
        None => c,
    }
}

/// Applies membership events until `gc` owns `n` partitions.
async fn until_owns(gc: &mut GroupConsumer, n: usize) {
    tokio::time::timeout(WAIT, async {
        while gc.assignment().len() != n {
            gc.wait_membership().await.expect("membership");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never owned {n} partitions: {:?}", gc.assignment()));
}

/// Reads records until `want` distinct (partition, offset) pairs were seen overall.
async fn read(gc: &mut GroupConsumer, seen: &mut Vec<(u32, u64)>, n: usize) {
    for _ in 0..n {
        let r = tokio::time::timeout(WAIT, gc.next())
            .await
            .expect("a record in time")
            .expect("not closed")
            .expect("a record");
        seen.push((r.partition, r.offset));
    }
}

async fn setup(c: &Client) {
    create(c, "ev", 4).await;
    for p in 0..4 {
        produce_n(c, "ev", p, 10, 1_000).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_hand_over_with_commits() {
    let b = broker();
    let c = b.client().await;
    setup(&c).await;

    let e = GroupConsumer::join(&c, GroupConfig::new("g", ["nope"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownTopic { .. }), "{e:?}");
    let mut c1 = GroupConsumer::join(&c, config(None)).await.unwrap();
    assert_eq!(c1.assignment().len(), 4);
    let mut seen1 = Vec::new();
    read(&mut c1, &mut seen1, 15).await;

    // A second member: c1 commits and gives up two partitions, then c2 gets them.
    let c2_join = tokio::spawn({
        let c = c.clone();
        async move { GroupConsumer::join(&c, config(None)).await }
    });
    until_owns(&mut c1, 2).await;
    let mut c2 = c2_join.await.unwrap().unwrap();
    until_owns(&mut c2, 2).await;
    let a1: BTreeSet<TopicPartition> = c1.assignment().into_iter().collect();
    let a2: BTreeSet<TopicPartition> = c2.assignment().into_iter().collect();
    assert!(a1.is_disjoint(&a2), "{a1:?} {a2:?}");
    assert_eq!(a1.len() + a2.len(), 4);

    // Plain commits and fenced commits of a partition the member does not own are refused.
    let e = c
        .commit_offsets(
            "g",
            &[OffsetCommit {
                topic: "ev".into(),
                partition: 0,
                offset: 0,
                metadata: String::new(),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::GroupNotEmpty { .. }), "{e:?}");
    let theirs = a2.iter().next().unwrap();
    let e = c
        .commit_offsets_fenced(
            "g",
            c1.member_id().unwrap(),
            c1.generation(),
            &[OffsetCommit {
                topic: theirs.topic.clone(),
                partition: theirs.partition,
                offset: 0,
                metadata: String::new(),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::IllegalGeneration { .. }), "{e:?}");

    // The rest of the 40 records, split between them, none twice.
    let mut seen2 = Vec::new();
    let left = 40 - seen1.len();
    let mut got = 0;
    while got < left {
        let before = seen1.len() + seen2.len();
        tokio::select! {
            r = tokio::time::timeout(Duration::from_millis(300), c1.next()) => {
                if let Ok(Some(r)) = r { let r = r.unwrap(); seen1.push((r.partition, r.offset)); }
            }
            r = tokio::time::timeout(Duration::from_millis(300), c2.next()) => {
                if let Ok(Some(r)) = r { let r = r.unwrap(); seen2.push((r.partition, r.offset)); }
            }
        }
        got += seen1.len() + seen2.len() - before;
    }
    let all: BTreeSet<(u32, u64)> = seen1.iter().chain(&seen2).copied().collect();
    assert_eq!(all.len(), 40, "every record once");
    assert_eq!(seen1.len() + seen2.len(), 40, "none twice");
    assert!(
        seen2
            .iter()
            .all(|(p, _)| a2.contains(&TopicPartition::new("ev", *p)))
    );

    let d = c.describe_group("g").await.unwrap();
    assert_eq!(d.state, GroupState::Stable, "{d:?}");
    assert_eq!(d.members.len(), 2);
    assert_eq!(d.strategy, AssignmentStrategy::Sticky);

    // c1 leaves (committing): c2 gets everything and has nothing left to read.
    c1.leave().await.unwrap();
    until_owns(&mut c2, 4).await;
    let r = tokio::time::timeout(Duration::from_millis(500), c2.next()).await;
    assert!(r.is_err(), "nothing left to read, got {r:?}");
    c2.close().await.unwrap();
    let d = c.describe_group("g").await.unwrap();
    assert_eq!(d.state, GroupState::Empty);
    let committed = c.fetch_offsets("g", &[]).await.unwrap();
    assert_eq!(committed.len(), 4);
    assert!(
        committed.iter().all(|o| o.offset == Some(10)),
        "{committed:?}"
    );
}

/// A second process with the same instance id replaces the running one: the older member is
/// told `MemberReplaced` once, owns nothing after it and does not rejoin (rejoining would
/// fence the newer one, which would rejoin and fence it back: a ping-pong that used to last
/// until the older one's next commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_static_member_stops_instead_of_rejoining() {
    let b = broker();
    let c = b.client().await;
    setup(&c).await;
    let mut older = GroupConsumer::join(&c, config(Some("host-1")))
        .await
        .unwrap();
    until_owns(&mut older, 4).await;
    let mut newer = GroupConsumer::join(&c, config(Some("host-1")))
        .await
        .unwrap();
    assert_eq!(newer.assignment().len(), 4, "the newer one takes them over");
    let e = tokio::time::timeout(WAIT, older.wait_membership())
        .await
        .expect("the older one is told in time")
        .unwrap_err();
    assert!(
        matches!(&e, Error::MemberReplaced { group, .. } if group == "g"),
        "{e:?}"
    );
    assert!(older.assignment().is_empty());
    let next = tokio::time::timeout(WAIT, older.next()).await;
    assert!(
        matches!(next, Ok(None)),
        "its membership ended for good: {next:?}"
    );
    // Several rejoin backoffs later the newer one still holds everything, alone.
    tokio::time::sleep(Duration::from_millis(600)).await;
    newer.poll_membership().await.unwrap();
    let d = c.describe_group("g").await.unwrap();
    assert_eq!(d.members.len(), 1, "{d:?}");
    assert_eq!(Some(d.members[0].member_id.as_str()), newer.member_id());
    assert_eq!(newer.assignment().len(), 4);
    drop(older);
    newer.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_returns_and_members_rejoin_after_a_broker_restart() {
    let mut b = broker();
    let c = b.client().await;
    setup(&c).await;
    let mut s = GroupConsumer::join(&c, config(Some("host-1")))
        .await
        .unwrap();
    let d_join = tokio::spawn({
        let c = c.clone();
        async move { GroupConsumer::join(&c, config(None)).await }
    });
    until_owns(&mut s, 2).await;
    let mut d = d_join.await.unwrap().unwrap();
    until_owns(&mut d, 2).await;
    let s_parts = s.assignment();
    let d_parts = d.assignment();
    let d_rebalances = d.rebalances();
    let old_member = s.member_id().unwrap().to_owned();
    let old_generation = s.generation();

    // The static member's process stops (close keeps its membership for the session).
    s.close().await.unwrap();
    let mut s = GroupConsumer::join(&c, config(Some("host-1")))
        .await
        .unwrap();
    assert_eq!(s.assignment(), s_parts, "same partitions back");
    assert_ne!(s.member_id().unwrap(), old_member);
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.poll_membership().await.unwrap();
    assert_eq!(
        d.rebalances(),
        d_rebalances,
        "the other member was not rebalanced"
    );
    // The previous incarnation is a zombie.
    let e = c
        .commit_offsets_fenced(
            "g",
            &old_member,
            old_generation,
            &[OffsetCommit {
                topic: s_parts[0].topic.clone(),
                partition: s_parts[0].partition,
                offset: 0,
                metadata: String::new(),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::FencedMember { .. }), "{e:?}");

    // Broker restart: both rejoin on their own and get the same partitions back.
    b.restart();
    tokio::time::timeout(WAIT, async {
        loop {
            let _ = s.poll_membership().await;
            let _ = d.poll_membership().await;
            if let Ok(desc) = c.describe_group("g").await
                && desc.state == GroupState::Stable
                && desc.members.iter().all(|m| m.connected)
                && s.assignment() == s_parts
                && d.assignment() == d_parts
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("members rejoined after the restart with their partitions");
    s.leave().await.unwrap();
    d.leave().await.unwrap();
}

/// Reliability bar §5 #11: members crash (dropped without committing) and are replaced, and
/// the broker is killed (-9) and restarted, while three members consume 400 records and
/// commit every 7: no record is skipped (every one is delivered at least once) and no
/// committed offset ever goes backwards (a monitor polls them every 10 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_a_broker_kill_skip_nothing_and_never_move_commits_back() {
    let mut b = broker();
    let c = b.client().await;
    create(&c, "ev", 4).await;
    for p in 0..4 {
        produce_n(&c, "ev", p, 100, 1_000).await;
    }
    let delivered: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let addr = b.addr();
    let member = |delivered: Arc<Mutex<Vec<(u32, u64)>>>| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let client = Client::connect(addr).await.unwrap();
            let mut gc = loop {
                match GroupConsumer::join(&client, config(None)).await {
                    Ok(g) => break g,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let mut n = 0u64;
            loop {
                match tokio::time::timeout(Duration::from_millis(200), gc.next()).await {
                    Ok(Some(Ok(r))) => {
                        delivered.lock().unwrap().push((r.partition, r.offset));
                        n += 1;
                        if n.is_multiple_of(7) {
                            let _ = gc.commit().await;
                        }
                    }
                    Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Ok(None) => return,
                    Err(_) => {
                        let _ = gc.commit().await;
                    }
                }
            }
        })
    };
    let regressions: Arc<Mutex<Vec<String>>> = Arc::default();
    let monitor = tokio::spawn({
        let c = c.clone();
        let regressions = regressions.clone();
        async move {
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            loop {
                if let Ok(v) = c.fetch_offsets("g", &[]).await {
                    for o in v {
                        let Some(off) = o.offset else { continue };
                        let prev = last.insert(o.partition, off).unwrap_or(0);
                        if off < prev {
                            regressions
                                .lock()
                                .unwrap()
                                .push(format!("ev/{}: {prev} -> {off}", o.partition));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let distinct = |d: &Arc<Mutex<Vec<(u32, u64)>>>| {
        d.lock()
            .unwrap()
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .len()
    };
    let until = |n: usize| {
        let d = delivered.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                while distinct(&d) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("stuck below {n} records: {}", distinct(&d)));
        }
    };
    let mut members: Vec<_> = (0..3).map(|_| member(delivered.clone())).collect();
    until(80).await;
    members.remove(0).abort(); // a crash: no commit, no leave
    members.push(member(delivered.clone()));
    until(160).await;
    b.restart(); // kill -9, then start again on the same data
    until(240).await;
    members.remove(0).abort();
    members.push(member(delivered.clone()));
    until(400).await;
    for m in &members {
        m.abort();
    }
    monitor.abort();
    let all = delivered.lock().unwrap().clone();
    assert_eq!(distinct(&delivered), 400, "every record delivered");
    assert!(
        regressions.lock().unwrap().is_empty(),
        "{:?}",
        regressions.lock().unwrap()
    );
    eprintln!(
        "delivered {} records for 400 (re-deliveries within uncommitted windows: {})",
        all.len(),
        all.len() - 400
    );
}

/// Streams: `poll_streams` reads only the listed streams, preferring the earlier ones; a
/// stream left out for a while continues where it stopped (its buffered records neither lost
/// nor repeated), and so does every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_streams_reads_the_listed_streams_in_order_and_a_left_out_one_resumes() {
    let b = broker();
    let c = b.client().await;
    create(&c, "hi", 1).await;
    create(&c, "lo", 1).await;
    produce_n(&c, "hi", 0, 100, 1_000).await;
    produce_n(&c, "lo", 0, 100, 1_000).await;
    let mut cfg = GroupConfig::new("lanes", ["hi", "lo"]);
    cfg.streams = vec![vec!["hi".into()], vec!["lo".into()]];
    let mut gc = GroupConsumer::join(&c, cfg).await.unwrap();
    until_owns(&mut gc, 2).await;
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    // `lo` only (its stream now holds the rest of what it fetched), then `hi` only.
    for _ in 0..10 {
        let (t, o) = next(&mut gc, &[1]).await;
        assert_eq!(t, "lo");
        seen.entry(t).or_default().push(o);
    }
    for _ in 0..30 {
        let (t, o) = next(&mut gc, &[0]).await;
        assert_eq!(t, "hi");
        seen.entry(t).or_default().push(o);
    }
    // `lo` preferred: its records come first while it has any ready.
    let (t, o) = next(&mut gc, &[1, 0]).await;
    assert_eq!(t, "lo", "the earlier listed stream's ready record first");
    seen.entry(t).or_default().push(o);
    // Nothing listed: no record (only a membership change may end the wait).
    match tokio::time::timeout(Duration::from_millis(300), gc.poll_streams(&[])).await {
        Err(_) | Ok(Some(Ok(spool_client::Polled::Membership))) => {}
        Ok(other) => panic!("read with no stream listed: {other:?}"),
    }
    while seen.values().map(Vec::len).sum::<usize>() < 200 {
        let (t, o) = next(&mut gc, &[0, 1]).await;
        seen.entry(t).or_default().push(o);
    }
    let want: Vec<u64> = (0..100).collect();
    assert_eq!(seen["hi"], want, "hi: every record once, in order");
    assert_eq!(seen["lo"], want, "lo: every record once, in order");
    let _ = gc.leave().await;
}

/// The next record of the listed streams (membership changes applied meanwhile).
async fn next(gc: &mut GroupConsumer, order: &[usize]) -> (String, u64) {
    loop {
        match tokio::time::timeout(WAIT, gc.poll_streams(order))
            .await
            .expect("a record in time")
            .expect("not closed")
            .expect("no error")
        {
            spool_client::Polled::Record(r) => return (r.topic.to_string(), r.offset),
            spool_client::Polled::Membership => gc.poll_membership().await.unwrap(),
        }
    }
}
