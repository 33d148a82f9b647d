//! Assignors: which member should own each partition.
//!
//! Pure functions of the members (id, sort key, topics), the partition counts and, for
//! sticky, the previous target. They compute a *target*; the coordinator moves ownership
//! towards it with revocations first (`coordinator.rs`).
//!
//! - **Range** (Kafka's): per topic, the subscribed members sorted by key get consecutive
//!   ranges; the first `n % k` get one more.
//! - **Round-robin**: every partition, sorted by (topic, partition), goes to the next member
//!   (in key order, cyclically) that subscribes to its topic.
//! - **Sticky**: keeps every partition with its previous owner when that owner still exists
//!   and subscribes to the topic; places the others on the least-loaded eligible member; then
//!   moves one partition at a time from a member holding at least two more than another
//!   eligible member, until none does. With identical subscriptions this ends with counts
//!   differing by at most one and moves the minimum number of partitions (property-tested in
//!   `coordinator.rs`): no member both loses and gains, and each loser stops at its share.
//!
//! Sort keys are the instance id of static members and the member id of the others, so a
//! static group gets the same range/round-robin layout after every restart.

use std::collections::{BTreeMap, BTreeSet};

/// A topic partition.
pub(crate) type Tp = (String, u32);

/// How partitions are spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Strategy {
    Range,
    RoundRobin,
    Sticky,
}

/// A member as the assignors see it.
#[derive(Clone, Debug)]
pub(crate) struct Sub<'a> {
    pub(crate) id: &'a str,
    pub(crate) key: &'a str,
    pub(crate) topics: &'a BTreeSet<String>,
}

/// The target owner of every partition of a subscribed topic that some member can take.
pub(crate) fn assign(
    strategy: Strategy,
    members: &[Sub<'_>],
    partitions: &BTreeMap<String, u32>,
    previous: &BTreeMap<Tp, String>,
) -> BTreeMap<Tp, String> {
    let mut sorted: Vec<&Sub<'_>> = members.iter().collect();
    sorted.sort_by(|a, b| (a.key, a.id).cmp(&(b.key, b.id)));
    match strategy {
        Strategy::Range => range(&sorted, partitions),
        Strategy::RoundRobin => round_robin(&sorted, partitions),
        Strategy::Sticky => sticky(&sorted, partitions, previous),
    }
}

fn subscribed<'a>(members: &[&'a Sub<'a>], topic: &str) -> Vec<&'a Sub<'a>> {
    members
        .iter()
        .copied()
        .filter(|m| m.topics.contains(topic))
        .collect()
}

fn range(members: &[&Sub<'_>], partitions: &BTreeMap<String, u32>) -> BTreeMap<Tp, String> {
    let mut out = BTreeMap::new();
    for (topic, &n) in partitions {
        let subs = subscribed(members, topic);
        if subs.is_empty() {
            continue;
        }
        let k = subs.len() as u32;
        let (each, extra) = (n / k, n % k);
        let mut next = 0;
        for (i, m) in subs.iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            for p in next..next + take {
                out.insert((topic.clone(), p), m.id.to_owned());
            }
            next += take;
        }
    }
    out
}

fn round_robin(members: &[&Sub<'_>], partitions: &BTreeMap<String, u32>) -> BTreeMap<Tp, String> {
    let mut out = BTreeMap::new();
    if members.is_empty() {
        return out;
    }
    let mut cursor = 0usize;
    for (topic, &n) in partitions {
        if !members.iter().any(|m| m.topics.contains(topic)) {
            continue;
        }
        for p in 0..n {
            // The next member in cyclic order that subscribes to the topic.
            loop {
                let m = members[cursor % members.len()];
                cursor += 1;
                if m.topics.contains(topic) {
                    out.insert((topic.clone(), p), m.id.to_owned());
                    break;
                }
            }
        }
    }
    out
}

fn sticky(
    members: &[&Sub<'_>],
    partitions: &BTreeMap<String, u32>,
    previous: &BTreeMap<Tp, String>,
) -> BTreeMap<Tp, String> {
    // Owned partitions per member (index into `members`), kept sorted.
    let index: BTreeMap<&str, usize> = members.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let mut owned: Vec<BTreeSet<Tp>> = vec![BTreeSet::new(); members.len()];
    let mut free: Vec<Tp> = Vec::new();
    for (topic, &n) in partitions {
        for p in 0..n {
            let tp = (topic.clone(), p);
            match previous
                .get(&tp)
                .and_then(|m| index.get(m.as_str()))
                .filter(|&&i| members[i].topics.contains(topic))
            {
                Some(&i) => {
                    owned[i].insert(tp);
                }
                None => free.push(tp),
            }
        }
    }
    // Free partitions to the least-loaded eligible member (ties: key order).
    for tp in free {
        let best = (0..members.len())
            .filter(|&i| members[i].topics.contains(&tp.0))
            .min_by_key(|&i| (owned[i].len(), i));
        if let Some(i) = best {
            owned[i].insert(tp);
        }
    }
    // Balance: move from a member with at least two more than an eligible one.
    loop {
        let mut by_load: Vec<usize> = (0..members.len()).collect();
        by_load.sort_by_key(|&i| (owned[i].len(), i));
        let mut moved = false;
        'search: for &over in by_load.iter().rev() {
            for &under in &by_load {
                if owned[over].len() < owned[under].len() + 2 {
                    break;
                }
                // The highest partition of `over` that `under` can take.
                let pick = owned[over]
                    .iter()
                    .rev()
                    .find(|tp| members[under].topics.contains(&tp.0))
                    .cloned();
                if let Some(tp) = pick {
                    owned[over].remove(&tp);
                    owned[under].insert(tp);
                    moved = true;
                    break 'search;
                }
            }
        }
        if !moved {
            break;
        }
    }
    let mut out = BTreeMap::new();
    for (i, set) in owned.into_iter().enumerate() {
        for tp in set {
            out.insert(tp, members[i].id.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn counts(t: &BTreeMap<Tp, String>) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for m in t.values() {
            *c.entry(m.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn range_and_round_robin_layouts() {
        let ab = topics(&["a", "b"]);
        let a = topics(&["a"]);
        let subs = [
            Sub {
                id: "m2",
                key: "x",
                topics: &ab,
            },
            Sub {
                id: "m1",
                key: "y",
                topics: &a,
            },
        ];
        let parts: BTreeMap<String, u32> = [("a".to_owned(), 3), ("b".to_owned(), 2)].into();
        let r = assign(Strategy::Range, &subs, &parts, &BTreeMap::new());
        // Sorted by key: m2 (x) first.
        assert_eq!(r[&("a".into(), 0)], "m2");
        assert_eq!(r[&("a".into(), 1)], "m2");
        assert_eq!(r[&("a".into(), 2)], "m1");
        assert_eq!(r[&("b".into(), 0)], "m2");
        assert_eq!(r[&("b".into(), 1)], "m2");
        let rr = assign(Strategy::RoundRobin, &subs, &parts, &BTreeMap::new());
        assert_eq!(rr.len(), 5);
        assert_eq!(rr[&("a".into(), 0)], "m2");
        assert_eq!(rr[&("a".into(), 1)], "m1");
        assert_eq!(rr[&("a".into(), 2)], "m2");
        // b: m1 does not subscribe, so m2 gets both.
        assert_eq!(rr[&("b".into(), 0)], "m2");
        assert_eq!(rr[&("b".into(), 1)], "m2");
    }

    #[test]
    fn sticky_keeps_and_balances() {
        let t = topics(&["t"]);
        let ids = ["a", "b", "c", "d"];
        let subs: Vec<Sub<'_>> = ids
            .iter()
            .map(|i| Sub {
                id: i,
                key: i,
                topics: &t,
            })
            .collect();
        let parts: BTreeMap<String, u32> = [("t".to_owned(), 10)].into();
        let first = assign(Strategy::Sticky, &subs, &parts, &BTreeMap::new());
        assert!(counts(&first).values().all(|&c| c == 2 || c == 3));
        // Idempotent.
        assert_eq!(assign(Strategy::Sticky, &subs, &parts, &first), first);
        // One member leaves: only its partitions move.
        let second = assign(Strategy::Sticky, &subs[..3], &parts, &first);
        for (tp, m) in &first {
            if m != "d" {
                assert_eq!(&second[tp], m, "{tp:?} moved");
            }
        }
        assert!(counts(&second).values().all(|&c| c == 3 || c == 4));
    }
}
