//! The coordinator of one group as a pure state machine: no I/O, no clock (time is passed
//! in as milliseconds of a monotonic clock), so it is property-tested against a model.
//!
//! # Ownership
//!
//! The broker's view of who owns a partition is the truth that fencing uses. A member *holds*
//! a partition from the moment an Assignment granting it is issued until the member
//! acknowledges an Assignment that no longer lists it (or leaves, or is removed). A partition
//! is granted only when nobody holds it. So a partition is never held by two members, and a
//! member stops using a partition (it acknowledges only after stopping and committing) before
//! anyone else is given it.
//!
//! A rebalance therefore runs in steps: the target (assignors, `assign.rs`) says who should
//! own what; each member gets an Assignment keeping what it holds and should keep, plus what
//! nobody holds and it should get; what it holds but should not keep is *revoked* (missing
//! from its Assignment) and released on its acknowledgement; then the freed partitions go to
//! their target owners in the next step. Members whose partitions do not change get no
//! message and keep their generation.
//!
//! # Generations and fencing
//!
//! The group generation increases with every step that changes some member's Assignment; an
//! Assignment carries it, and a member's *generation* is that of its latest Assignment. Each
//! held partition remembers the generation it was granted at (its *epoch*). A commit naming
//! (member, generation) for a partition is accepted iff the member exists, holds the
//! partition, and `epoch <= generation <= member generation`. A member's revoked-but-unacked
//! partitions are still held, so it can commit them before acknowledging. A delayed commit of
//! an earlier ownership period (the partition went away and came back) has a generation below
//! the epoch and is refused; a commit from a member id that left, expired or was replaced is
//! refused whatever its generation.
//!
//! # Liveness
//!
//! A member is removed when nothing was heard from it for its session timeout, or when it did
//! not acknowledge a revocation within its rebalance timeout. A dynamic member whose stream
//! ends is removed at once; a static member's (instance id) is kept, disconnected, until its
//! session expires, and a join with the same instance id (or, for any member, with its member
//! id) takes over its partitions under a new member id, fencing the old one, without changing
//! anybody else's assignment.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub(crate) use super::assign::{Strategy, Tp};
use super::assign::{Sub, assign};

/// A member of the group. Equality (what decides whether a change must be persisted) ignores
/// the volatile `last_heard` and `connected`, and `acked`: an acknowledgement that releases
/// nothing changes nothing that matters after a restart (every member must rejoin and is sent
/// a new Assignment then), so it costs no fdatasync.
#[derive(Clone, Debug, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    pub(crate) id: String,
    pub(crate) instance: Option<String>,
    pub(crate) topics: BTreeSet<String>,
    pub(crate) session_ms: u64,
    pub(crate) rebalance_ms: u64,
    /// Its latest Assignment.
    pub(crate) told: BTreeSet<Tp>,
    /// Generation of its latest Assignment.
    pub(crate) generation: u64,
    /// Latest generation it acknowledged.
    pub(crate) acked: u64,
    /// Revoked but not acknowledged yet: partition → (generation that revoked it, when).
    #[serde(with = "as_pairs")]
    pub(crate) revoking: BTreeMap<Tp, (u64, u64)>,
    /// Generation each held partition (told ∪ revoking) was granted at.
    #[serde(with = "as_pairs")]
    pub(crate) epochs: BTreeMap<Tp, u64>,
    #[serde(skip)]
    pub(crate) last_heard: u64,
    #[serde(skip)]
    pub(crate) connected: bool,
}

impl PartialEq for Member {
    fn eq(&self, o: &Member) -> bool {
        (
            &self.id,
            &self.instance,
            &self.topics,
            self.session_ms,
            self.rebalance_ms,
            &self.told,
            self.generation,
            &self.revoking,
            &self.epochs,
        ) == (
            &o.id,
            &o.instance,
            &o.topics,
            o.session_ms,
            o.rebalance_ms,
            &o.told,
            o.generation,
            &o.revoking,
            &o.epochs,
        )
    }
}

impl Member {
    fn holds(&self, tp: &Tp) -> bool {
        self.told.contains(tp) || self.revoking.contains_key(tp)
    }

    fn deadline(&self) -> u64 {
        let session = self.last_heard.saturating_add(self.session_ms);
        match self.revoking.values().map(|&(_, since)| since).min() {
            Some(since) => session.min(since.saturating_add(self.rebalance_ms)),
            None => session,
        }
    }
}

/// Maps with tuple keys as JSON arrays of pairs.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub(super) fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// What a join asks for (validated by the caller).
#[derive(Clone, Debug)]
pub(crate) struct JoinSpec {
    /// The id the new member gets (chosen by the caller, unique).
    pub(crate) new_id: String,
    pub(crate) instance: Option<String>,
    /// A previous member id to take over.
    pub(crate) previous_id: Option<String>,
    pub(crate) topics: BTreeSet<String>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) session_ms: u64,
    pub(crate) rebalance_ms: u64,
}

/// Why a member's stream is ended by the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    /// It asked to leave (or LeaveGroup named it).
    Left,
    /// Nothing heard for its session timeout.
    SessionExpired,
    /// It did not acknowledge a revocation in time.
    RebalanceTimeout,
    /// A newer incarnation joined with its instance or member id.
    Replaced,
}

/// Something the caller must do after a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Send the member this Assignment.
    Assign {
        member: String,
        generation: u64,
        partitions: Vec<Tp>,
    },
    /// End the member's stream.
    Remove { member: String, why: Removal },
}

/// Why a fenced commit is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    UnknownMember,
    IllegalGeneration { tp: Tp, reason: String },
}

/// Why a join is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JoinRefusal {
    StrategyMismatch { group: Strategy, asked: Strategy },
    TooManyMembers(usize),
}

/// Where the group is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Empty,
    Rebalancing,
    Stable,
}

/// The durable part of a group (what `snapshot`/`restore` carry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) members: Vec<Member>,
    /// Target: (topic, partition, member).
    pub(crate) target: Vec<(String, u32, String)>,
    /// Partition counts of subscribed topics.
    pub(crate) partitions: BTreeMap<String, u32>,
}

/// One group's coordinator.
#[derive(Clone, Debug, Default)]
pub(crate) struct Coordinator {
    generation: u64,
    strategy: Option<Strategy>,
    members: BTreeMap<String, Member>,
    target: BTreeMap<Tp, String>,
    partitions: BTreeMap<String, u32>,
    max_members: usize,
    /// Rebalances started (membership or metadata changes that changed the target).
    rebalances: u64,
}

impl Coordinator {
    pub(crate) fn new(max_members: usize) -> Coordinator {
        Coordinator {
            max_members,
            ..Coordinator::default()
        }
    }

    /// Restores a persisted group after a restart: every member is disconnected and has its
    /// session timeout from `now` to rejoin.
    pub(crate) fn restore(s: Snapshot, max_members: usize, now: u64) -> Coordinator {
        let members = s
            .members
            .into_iter()
            .map(|mut m| {
                m.last_heard = now;
                m.connected = false;
                for v in m.revoking.values_mut() {
                    v.1 = now;
                }
                (m.id.clone(), m)
            })
            .collect();
        Coordinator {
            generation: s.generation,
            strategy: s.strategy,
            members,
            target: s.target.into_iter().map(|(t, p, m)| ((t, p), m)).collect(),
            partitions: s.partitions,
            max_members,
            rebalances: 0,
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            strategy: self.strategy,
            members: self.members.values().cloned().collect(),
            target: self
                .target
                .iter()
                .map(|((t, p), m)| (t.clone(), *p, m.clone()))
                .collect(),
            partitions: self.partitions.clone(),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    pub(crate) fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub(crate) fn member(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn rebalances(&self) -> u64 {
        self.rebalances
    }

    /// Topics some member subscribes to.
    pub(crate) fn topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| m.topics.iter().cloned())
            .collect()
    }

    /// Partitions of subscribed topics that nobody holds.
    pub(crate) fn unassigned(&self) -> Vec<Tp> {
        let held: BTreeSet<&Tp> = self
            .members
            .values()
            .flat_map(|m| m.told.iter().chain(m.revoking.keys()))
            .collect();
        let topics = self.topics();
        self.partitions
            .iter()
            .filter(|(t, _)| topics.contains(*t))
            .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
            .filter(|tp| !held.contains(tp))
            .collect()
    }

    pub(crate) fn state(&self) -> State {
        if self.members.is_empty() {
            return State::Empty;
        }
        let settled = self.members.values().all(|m| {
            m.revoking.is_empty()
                && m.acked >= m.generation
                && self
                    .target
                    .iter()
                    .filter(|(_, owner)| **owner == m.id)
                    .all(|(tp, _)| m.told.contains(tp))
        });
        if settled {
            State::Stable
        } else {
            State::Rebalancing
        }
    }

    /// When `tick` next has something to do.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.members.values().map(Member::deadline).min()
    }

    /// A member joins. Returns its effects; the new member always gets an Assignment.
    pub(crate) fn join(&mut self, now: u64, spec: JoinSpec) -> Result<Vec<Effect>, JoinRefusal> {
        let mut effects = Vec::new();
        // Whom does it take over?
        let previous = spec
            .instance
            .as_ref()
            .and_then(|i| {
                self.members
                    .values()
                    .find(|m| m.instance.as_ref() == Some(i))
            })
            .or_else(|| {
                spec.previous_id
                    .as_ref()
                    .and_then(|id| self.members.get(id))
                    .filter(|m| m.instance == spec.instance)
            })
            .map(|m| m.id.clone());
        // The group's strategy binds while somebody other than the member replaced is in.
        let others = self.members.keys().any(|id| Some(id) != previous.as_ref());
        if others {
            if let (Some(current), Some(asked)) = (self.strategy, spec.strategy)
                && current != asked
            {
                return Err(JoinRefusal::StrategyMismatch {
                    group: current,
                    asked,
                });
            }
        } else {
            self.strategy = Some(spec.strategy.unwrap_or(Strategy::Sticky));
        }
        if previous.is_none() && self.members.len() >= self.max_members {
            return Err(JoinRefusal::TooManyMembers(self.max_members));
        }
        let mut member = Member {
            id: spec.new_id.clone(),
            instance: spec.instance,
            topics: spec.topics,
            session_ms: spec.session_ms,
            rebalance_ms: spec.rebalance_ms,
            told: BTreeSet::new(),
            generation: 0,
            acked: 0,
            revoking: BTreeMap::new(),
            epochs: BTreeMap::new(),
            last_heard: now,
            connected: true,
        };
        let mut membership_changed = true;
        if let Some(old_id) = previous {
            let old = self.members.remove(&old_id).expect("found above");
            // The old incarnation is fenced by its id; what it was revoking is free now. What
            // it held goes to the new incarnation, in the target too.
            member.told = old.told;
            for owner in self.target.values_mut() {
                if *owner == old_id {
                    owner.clone_from(&member.id);
                }
            }
            membership_changed = member.topics != old.topics;
            if old.connected {
                effects.push(Effect::Remove {
                    member: old_id,
                    why: Removal::Replaced,
                });
            }
        }
        let id = member.id.clone();
        self.members.insert(id.clone(), member);
        if membership_changed {
            self.rebalances += 1;
        }
        effects.extend(self.reconcile(now, Some(&id)));
        Ok(effects)
    }

    /// A heartbeat (or any message) from `member`. False if it is not a member.
    pub(crate) fn heard(&mut self, now: u64, member: &str) -> bool {
        match self.members.get_mut(member) {
            Some(m) => {
                m.last_heard = now;
                true
            }
            None => false,
        }
    }

    /// `member` applied its Assignment of `generation`. Releases what that revoked.
    pub(crate) fn ack(&mut self, now: u64, member: &str, generation: u64) -> Vec<Effect> {
        let Some(m) = self.members.get_mut(member) else {
            return Vec::new();
        };
        m.last_heard = now;
        if generation > m.generation {
            return Vec::new();
        }
        m.acked = m.acked.max(generation);
        let released: Vec<Tp> = m
            .revoking
            .iter()
            .filter(|(_, (g, _))| *g <= generation)
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &released {
            m.revoking.remove(tp);
            m.epochs.remove(tp);
        }
        if released.is_empty() {
            return Vec::new();
        }
        self.reconcile(now, None)
    }

    /// `member` leaves (or is removed by LeaveGroup).
    pub(crate) fn leave(&mut self, now: u64, member: &str) -> Vec<Effect> {
        self.remove(now, member, Removal::Left)
    }

    /// The static member with `instance`, if any.
    pub(crate) fn by_instance(&self, instance: &str) -> Option<&str> {
        self.members
            .values()
            .find(|m| m.instance.as_deref() == Some(instance))
            .map(|m| m.id.as_str())
    }

    /// `member`'s stream ended without a leave.
    pub(crate) fn disconnected(&mut self, now: u64, member: &str) -> Vec<Effect> {
        let Some(m) = self.members.get_mut(member) else {
            return Vec::new();
        };
        if m.instance.is_some() {
            m.connected = false;
            return Vec::new();
        }
        self.members.remove(member);
        self.rebalances += 1;
        self.reconcile(now, None)
    }

    /// Removes members whose session or rebalance timeout passed.
    pub(crate) fn tick(&mut self, now: u64) -> Vec<Effect> {
        let expired: Vec<(String, Removal)> = self
            .members
            .values()
            .filter(|m| m.deadline() <= now)
            .map(|m| {
                let why = if m.last_heard.saturating_add(m.session_ms) <= now {
                    Removal::SessionExpired
                } else {
                    Removal::RebalanceTimeout
                };
                (m.id.clone(), why)
            })
            .collect();
        let mut effects = Vec::new();
        for (id, why) in expired {
            effects.extend(self.remove(now, &id, why));
        }
        effects
    }

    /// New partition counts of the subscribed topics (0 or absent: the topic is gone).
    pub(crate) fn set_partitions(
        &mut self,
        now: u64,
        partitions: BTreeMap<String, u32>,
    ) -> Vec<Effect> {
        if partitions == self.partitions {
            return Vec::new();
        }
        self.partitions = partitions;
        self.rebalances += 1;
        self.reconcile(now, None)
    }

    /// May (`member`, `generation`) commit `tps`?
    pub(crate) fn check_commit<'a>(
        &self,
        member: &str,
        generation: u64,
        tps: impl IntoIterator<Item = &'a Tp>,
    ) -> Result<(), Refusal> {
        let m = self.members.get(member).ok_or(Refusal::UnknownMember)?;
        for tp in tps {
            if !m.holds(tp) {
                return Err(Refusal::IllegalGeneration {
                    tp: tp.clone(),
                    reason: format!(
                        "the member does not own it (member generation {})",
                        m.generation
                    ),
                });
            }
            let epoch = m.epochs.get(tp).copied().unwrap_or(0);
            if generation < epoch || generation > m.generation {
                return Err(Refusal::IllegalGeneration {
                    tp: tp.clone(),
                    reason: format!(
                        "generation {generation} is outside [{epoch}, {}], the generations in which the member owns it",
                        m.generation
                    ),
                });
            }
        }
        Ok(())
    }

    fn remove(&mut self, now: u64, member: &str, why: Removal) -> Vec<Effect> {
        if self.members.remove(member).is_none() {
            return Vec::new();
        }
        self.rebalances += 1;
        let mut effects = vec![Effect::Remove {
            member: member.to_owned(),
            why,
        }];
        effects.extend(self.reconcile(now, None));
        effects
    }

    /// Recomputes the target and issues the next step towards it. `force`: a member that gets
    /// an Assignment even if its partitions did not change (a new incarnation).
    fn reconcile(&mut self, now: u64, force: Option<&str>) -> Vec<Effect> {
        let Some(strategy) = self.strategy else {
            return Vec::new();
        };
        let subs: Vec<Sub<'_>> = self
            .members
            .values()
            .map(|m| Sub {
                id: &m.id,
                key: m.instance.as_deref().unwrap_or(&m.id),
                topics: &m.topics,
            })
            .collect();
        let target = assign(strategy, &subs, &self.partitions, &self.target);
        self.target = target;
        let mut holder: BTreeMap<Tp, String> = BTreeMap::new();
        for m in self.members.values() {
            for tp in m.told.iter().chain(m.revoking.keys()) {
                holder.insert(tp.clone(), m.id.clone());
            }
        }
        let mut wants: BTreeMap<&str, BTreeSet<Tp>> = BTreeMap::new();
        for (tp, m) in &self.target {
            wants.entry(m.as_str()).or_default().insert(tp.clone());
        }
        let next = self.generation + 1;
        let mut effects = Vec::new();
        let mut changed = false;
        // Partitions a new incarnation inherited but should not keep are free at once; members
        // looked at before it in this pass could not see that.
        let mut dropped = false;
        let empty = BTreeSet::new();
        for m in self.members.values_mut() {
            let want = wants.get(m.id.as_str()).unwrap_or(&empty);
            let new_told: BTreeSet<Tp> = want
                .iter()
                .filter(|tp| holder.get(*tp).is_none_or(|h| *h == m.id))
                .cloned()
                .collect();
            let forced = force == Some(m.id.as_str());
            if new_told == m.told && !forced {
                continue;
            }
            // A new incarnation was never told what it inherited: nothing to revoke.
            if m.generation > 0 {
                for tp in m.told.difference(&new_told) {
                    m.revoking.insert(tp.clone(), (next, now));
                }
            } else {
                dropped |= m.told.difference(&new_told).next().is_some();
            }
            for tp in &new_told {
                if m.revoking.remove(tp).is_some() {
                    continue; // held all along
                }
                if forced || !m.told.contains(tp) {
                    m.epochs.insert(tp.clone(), next);
                }
            }
            m.told = new_told;
            m.generation = next;
            changed = true;
            if m.connected {
                effects.push(Effect::Assign {
                    member: m.id.clone(),
                    generation: next,
                    partitions: m.told.iter().cloned().collect(),
                });
            }
        }
        if changed {
            self.generation = next;
        }
        if dropped {
            effects.extend(self.reconcile(now, None));
        }
        effects
    }

    /// Members holding `tp` (at most one).
    #[cfg(test)]
    pub(crate) fn holder(&self, tp: &Tp) -> Vec<&str> {
        self.members
            .values()
            .filter(|m| m.holds(tp))
            .map(|m| m.id.as_str())
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn target(&self) -> &BTreeMap<Tp, String> {
        &self.target
    }
}

#[cfg(test)]
mod tests {
    //! Model-based tests: random sequences of joins, leaves, disconnects, acknowledgements,
    //! heartbeats, time passing, partition growth and restarts, against simulated clients
    //! that apply every Assignment at once and acknowledge it later. After every step:
    //! - no partition is held by two members, and no two live clients believe they own the
    //!   same partition (a client believes its latest Assignment);
    //! - a live client's belief is within what the broker says it holds (so its commits of
    //!   what it believes are accepted), and removed members' commits are refused;
    //! - generations never go backwards;
    //! - once every client acknowledged, the group is stable and every partition of a
    //!   subscribed topic is owned;
    //! - sticky, with identical subscriptions, moves the minimum number of partitions.

    use proptest::prelude::{
        Just, ProptestConfig, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest,
    };
    use proptest::strategy::Strategy as _;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Join { instance: Option<u8>, topics: u8 },
        Leave(u8),
        Disconnect(u8),
        Ack(u8),
        AckAll,
        Heartbeats,
        Advance(u64),
        Grow(bool),
        Restart,
        ZombieCommit(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        prop_oneof![
            4 => (prop::option::of(0u8..4), 1u8..4).prop_map(|(instance, topics)| Op::Join { instance, topics }),
            2 => any::<u8>().prop_map(Op::Leave),
            2 => any::<u8>().prop_map(Op::Disconnect),
            4 => any::<u8>().prop_map(Op::Ack),
            3 => Just(Op::AckAll),
            2 => Just(Op::Heartbeats),
            2 => (0u64..1500).prop_map(Op::Advance),
            1 => any::<bool>().prop_map(Op::Grow),
            1 => Just(Op::Restart),
            1 => any::<u8>().prop_map(Op::ZombieCommit),
        ]
    }

    const SESSION: u64 = 1000;

    /// A simulated client: what it was last told.
    #[derive(Clone, Debug, Default)]
    struct Client {
        generation: u64,
        owns: BTreeSet<Tp>,
        acked: u64,
    }

    struct World {
        c: Coordinator,
        now: u64,
        clients: BTreeMap<String, Client>,
        removed: Vec<String>,
        partitions: BTreeMap<String, u32>,
        next_id: u64,
        last_generation: u64,
        strategy: Strategy,
        homogeneous: bool,
    }

    impl World {
        fn new(strategy: Strategy, homogeneous: bool) -> World {
            let partitions: BTreeMap<String, u32> =
                [("a".to_owned(), 5), ("b".to_owned(), 3)].into();
            let mut c = Coordinator::new(100);
            c.set_partitions(0, partitions.clone());
            World {
                c,
                now: 0,
                clients: BTreeMap::new(),
                removed: Vec::new(),
                partitions,
                next_id: 0,
                last_generation: 0,
                strategy,
                homogeneous,
            }
        }

        fn apply(&mut self, effects: Vec<Effect>) {
            for e in effects {
                match e {
                    Effect::Assign {
                        member,
                        generation,
                        partitions,
                    } => {
                        let c = self
                            .clients
                            .get_mut(&member)
                            .expect("assignment to a client");
                        assert!(generation > c.generation, "generations go forward");
                        c.generation = generation;
                        c.owns = partitions.into_iter().collect();
                    }
                    Effect::Remove { member, .. } => {
                        self.clients.remove(&member);
                        self.removed.push(member);
                    }
                }
            }
        }

        fn pick(&self, i: u8) -> Option<String> {
            let ids: Vec<&String> = self.clients.keys().collect();
            (!ids.is_empty()).then(|| ids[i as usize % ids.len()].clone())
        }

        fn ack(&mut self, id: &str) {
            let g = self.clients[id].generation;
            if self.clients[id].acked == g {
                return;
            }
            self.clients.get_mut(id).unwrap().acked = g;
            let e = self.c.ack(self.now, id, g);
            self.apply(e);
        }

        fn step(&mut self, op: &Op) {
            match op {
                Op::Join { instance, topics } => {
                    self.next_id += 1;
                    let id = format!("m{}", self.next_id);
                    let topics: BTreeSet<String> = if self.homogeneous {
                        ["a", "b"].iter().map(|t| (*t).to_owned()).collect()
                    } else {
                        [(1, "a"), (2, "b")]
                            .iter()
                            .filter(|(bit, _)| topics & bit != 0)
                            .map(|(_, t)| (*t).to_owned())
                            .collect()
                    };
                    let spec = JoinSpec {
                        new_id: id.clone(),
                        instance: instance.map(|i| format!("i{i}")),
                        previous_id: None,
                        topics,
                        strategy: Some(self.strategy),
                        session_ms: SESSION,
                        rebalance_ms: SESSION * 2,
                    };
                    // Others not replaced must not hear anything when a static member returns
                    // with unchanged topics.
                    let replacing = spec
                        .instance
                        .as_deref()
                        .and_then(|i| self.c.by_instance(i))
                        .map(str::to_owned);
                    let was_stable = self.c.state() == State::Stable;
                    let before = self.target_owned_by_others(replacing.as_deref());
                    self.clients.insert(id.clone(), Client::default());
                    let effects = self.c.join(self.now, spec).expect("join");
                    if let Some(old) = &replacing
                        && self.homogeneous
                        && was_stable
                    {
                        for e in &effects {
                            if let Effect::Assign { member, .. } = e {
                                assert!(
                                    member == &id,
                                    "static rejoin of {old} sent an assignment to {member}"
                                );
                            }
                        }
                        assert_eq!(before, self.target_owned_by_others(Some(&id)));
                    }
                    self.apply(effects);
                    assert!(
                        self.clients.contains_key(&id),
                        "new member got its assignment"
                    );
                }
                Op::Leave(i) => {
                    if let Some(id) = self.pick(*i) {
                        let e = self.c.leave(self.now, &id);
                        self.apply(e);
                    }
                }
                Op::Disconnect(i) => {
                    if let Some(id) = self.pick(*i) {
                        let is_static = self.c.member(&id).is_some_and(|m| m.instance.is_some());
                        let e = self.c.disconnected(self.now, &id);
                        if !is_static {
                            // Gone at once: its stream is closed, so no Remove effect.
                            assert!(self.c.member(&id).is_none());
                            self.clients.remove(&id);
                            self.removed.push(id.clone());
                        }
                        self.apply(e);
                        if is_static {
                            // It keeps its partitions, but is not reachable: model it as a
                            // client that no longer acts (it will expire or be replaced).
                            let c = self.clients.remove(&id).unwrap();
                            self.removed.push(id.clone());
                            // Its belief still must not overlap anyone's: keep checking it as
                            // the partitions it holds until it is gone.
                            let _ = c;
                        }
                    }
                }
                Op::Ack(i) => {
                    if let Some(id) = self.pick(*i) {
                        self.ack(&id);
                    }
                }
                Op::AckAll => self.settle(),
                Op::Heartbeats => {
                    let ids: Vec<String> = self.clients.keys().cloned().collect();
                    for id in ids {
                        assert!(self.c.heard(self.now, &id));
                    }
                }
                Op::Advance(ms) => {
                    self.now += ms;
                    let e = self.c.tick(self.now);
                    self.apply(e);
                }
                Op::Grow(a) => {
                    let t = if *a { "a" } else { "b" };
                    *self.partitions.get_mut(t).unwrap() += 1;
                    let e = self.c.set_partitions(self.now, self.partitions.clone());
                    self.apply(e);
                }
                Op::Restart => {
                    let snap = self.c.snapshot();
                    let json = serde_json::to_vec(&snap).unwrap();
                    let back: Snapshot = serde_json::from_slice(&json).unwrap();
                    assert_eq!(back, snap);
                    self.c = Coordinator::restore(back, 100, self.now);
                    // Every stream is gone; clients are disconnected members now (they could
                    // rejoin by id or instance; here they just stop acting).
                    let ids: Vec<String> = std::mem::take(&mut self.clients).into_keys().collect();
                    self.removed.extend(ids);
                }
                Op::ZombieCommit(i) => {
                    if !self.removed.is_empty() {
                        let id = &self.removed[*i as usize % self.removed.len()];
                        if self.c.member(id).is_none() {
                            let tp = ("a".to_owned(), 0);
                            assert_eq!(
                                self.c.check_commit(id, u64::MAX / 2, [&tp]),
                                Err(Refusal::UnknownMember)
                            );
                        }
                    }
                }
            }
            self.check();
        }

        fn target_owned_by_others(&self, except: Option<&str>) -> BTreeMap<Tp, String> {
            self.c
                .target()
                .iter()
                .filter(|(_, m)| Some(m.as_str()) != except)
                .map(|(tp, m)| (tp.clone(), m.clone()))
                .collect()
        }

        /// Acknowledges until nothing changes.
        fn settle(&mut self) {
            for _ in 0..10 {
                let pending: Vec<String> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.acked < c.generation)
                    .map(|(id, _)| id.clone())
                    .collect();
                if pending.is_empty() {
                    break;
                }
                for id in pending {
                    if self.clients.contains_key(&id) {
                        self.ack(&id);
                    }
                }
            }
        }

        fn check(&mut self) {
            // One holder per partition.
            for (t, &n) in &self.partitions {
                for p in 0..n {
                    let tp = (t.clone(), p);
                    assert!(
                        self.c.holder(&tp).len() <= 1,
                        "{tp:?} held by {:?}",
                        self.c.holder(&tp)
                    );
                }
            }
            // Live clients' beliefs are disjoint and within what the broker says they hold,
            // so committing what they believe is accepted.
            let mut seen: BTreeMap<&Tp, &str> = BTreeMap::new();
            for (id, c) in &self.clients {
                for tp in &c.owns {
                    if let Some(other) = seen.insert(tp, id) {
                        panic!("{tp:?} owned by {other} and {id}");
                    }
                }
                if c.generation > 0 {
                    self.c
                        .check_commit(id, c.generation, c.owns.iter())
                        .expect("a live member may commit what it owns");
                }
            }
            assert!(self.c.generation() >= self.last_generation);
            self.last_generation = self.c.generation();
        }

        /// Every client acknowledges; then the group is stable and every partition owned.
        fn check_settled(&mut self) {
            // Disconnected members cannot acknowledge: let them expire first.
            self.settle();
            self.now += 3 * SESSION;
            let ids: Vec<String> = self.clients.keys().cloned().collect();
            for id in ids {
                self.c.heard(self.now, &id);
            }
            let e = self.c.tick(self.now);
            self.apply(e);
            self.settle();
            self.check();
            if self.c.member_count() == 0 {
                assert_eq!(self.c.state(), State::Empty);
                return;
            }
            assert_eq!(self.c.state(), State::Stable, "{:#?}", self.c.snapshot());
            let subscribed = self.c.topics();
            for (t, &n) in &self.partitions {
                if !subscribed.contains(t) {
                    continue;
                }
                for p in 0..n {
                    let tp = (t.clone(), p);
                    let owners: Vec<&String> = self
                        .clients
                        .iter()
                        .filter(|(_, c)| c.owns.contains(&tp))
                        .map(|(id, _)| id)
                        .collect();
                    assert_eq!(owners.len(), 1, "{tp:?} owned by {owners:?}");
                }
            }
        }
    }

    fn strategy() -> impl proptest::strategy::Strategy<Value = super::Strategy> {
        prop_oneof![
            Just(super::Strategy::Range),
            Just(super::Strategy::RoundRobin),
            Just(super::Strategy::Sticky),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn coordinator_against_model(
            strategy in strategy(),
            homogeneous in any::<bool>(),
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let mut w = World::new(strategy, homogeneous);
            for op in &ops {
                w.step(op);
            }
            w.check_settled();
        }

        /// Sticky with identical subscriptions: a membership change moves exactly as many
        /// partitions as balance requires.
        #[test]
        fn sticky_moves_the_minimum(
            counts in prop::collection::vec(0usize..6, 1..8),
            extra in 0u32..6,
            joiners in 0usize..3,
        ) {
            let topics: BTreeSet<String> = ["t".to_owned()].into();
            // A previous (possibly unbalanced) target over survivors, some free partitions.
            let n: u32 = counts.iter().sum::<usize>() as u32 + extra;
            let ids: Vec<String> = (0..counts.len() + joiners).map(|i| format!("m{i:02}")).collect();
            let mut previous = BTreeMap::new();
            let mut p = 0;
            for (i, &c) in counts.iter().enumerate() {
                for _ in 0..c {
                    previous.insert(("t".to_owned(), p), ids[i].clone());
                    p += 1;
                }
            }
            let subs: Vec<Sub<'_>> = ids.iter().map(|id| Sub { id, key: id, topics: &topics }).collect();
            let parts: BTreeMap<String, u32> = [("t".to_owned(), n)].into();
            let next = assign(super::Strategy::Sticky, &subs, &parts, &previous);
            let moved = previous.iter().filter(|(tp, m)| next[*tp] != **m).count();
            let m = ids.len();
            let (q, r) = (n as usize / m, n as usize % m);
            let mut cs: Vec<usize> = counts.clone();
            cs.resize(m, 0);
            cs.sort_unstable_by(|a, b| b.cmp(a));
            let minimum: usize = cs
                .iter()
                .enumerate()
                .map(|(i, &c)| c.saturating_sub(q + usize::from(i < r)))
                .sum();
            prop_assert_eq!(moved, minimum);
            let mut per: BTreeMap<&String, usize> = BTreeMap::new();
            for owner in next.values() {
                *per.entry(owner).or_default() += 1;
            }
            prop_assert_eq!(next.len(), n as usize);
            for id in &ids {
                let c = per.get(id).copied().unwrap_or(0);
                prop_assert!(c == q || c == q + 1, "{} has {}", id, c);
            }
        }
    }

    #[test]
    fn commit_fencing_by_epoch_and_member() {
        let mut c = Coordinator::new(10);
        c.set_partitions(0, [("t".to_owned(), 2)].into());
        let join = |id: &str| JoinSpec {
            new_id: id.to_owned(),
            instance: None,
            previous_id: None,
            topics: ["t".to_owned()].into(),
            strategy: Some(Strategy::Sticky),
            session_ms: 1000,
            rebalance_ms: 1000,
        };
        c.join(0, join("a")).unwrap();
        assert_eq!(c.member("a").unwrap().told.len(), 2);
        let g1 = c.member("a").unwrap().generation;
        let tp1 = ("t".to_owned(), 1);
        c.check_commit("a", g1, [&tp1]).unwrap();
        // b joins: t/1 is revoked from a (still held by a until it acks).
        c.join(1, join("b")).unwrap();
        let a = c.member("a").unwrap();
        assert!(a.revoking.contains_key(&tp1));
        assert!(c.member("b").unwrap().told.is_empty());
        assert_eq!(c.state(), State::Rebalancing);
        // a may still commit t/1 (commit before giving it up), with either generation.
        c.check_commit("a", g1, [&tp1]).unwrap();
        c.check_commit("a", a.generation, [&tp1]).unwrap();
        // b may not.
        assert!(matches!(
            c.check_commit("b", 1, [&tp1]),
            Err(Refusal::IllegalGeneration { .. })
        ));
        let ga = a.generation;
        c.ack(2, "a", ga);
        // Now b has it, a is refused.
        let b = c.member("b").unwrap();
        assert!(b.told.contains(&tp1));
        c.check_commit("b", b.generation, [&tp1]).unwrap();
        assert!(matches!(
            c.check_commit("a", ga, [&tp1]),
            Err(Refusal::IllegalGeneration { .. })
        ));
        // b leaves; t/1 goes back to a at a later generation: a delayed commit of a's first
        // ownership (g1) is refused.
        c.leave(3, "b");
        let a = c.member("a").unwrap();
        assert!(a.told.contains(&tp1));
        assert!(matches!(
            c.check_commit("a", g1, [&tp1]),
            Err(Refusal::IllegalGeneration { .. })
        ));
        c.check_commit("a", a.generation, [&tp1]).unwrap();
        assert_eq!(c.check_commit("b", 99, [&tp1]), Err(Refusal::UnknownMember));
        // Session expiry.
        // a was last heard at its ack (time 2).
        assert!(c.tick(2 + 999).is_empty());
        let e = c.tick(2 + 1000);
        assert!(e.contains(&Effect::Remove {
            member: "a".into(),
            why: Removal::SessionExpired
        }));
        assert_eq!(c.state(), State::Empty);
    }

    #[test]
    fn static_member_returns_without_moving_others() {
        let mut c = Coordinator::new(10);
        c.set_partitions(0, [("t".to_owned(), 4)].into());
        let join = |id: &str, inst: Option<&str>| JoinSpec {
            new_id: id.to_owned(),
            instance: inst.map(str::to_owned),
            previous_id: None,
            topics: ["t".to_owned()].into(),
            strategy: None,
            session_ms: 1000,
            rebalance_ms: 1000,
        };
        c.join(0, join("a", Some("x"))).unwrap();
        let g = c.member("a").unwrap().generation;
        c.ack(0, "a", g);
        c.join(0, join("b", None)).unwrap();
        for _ in 0..3 {
            for id in ["a", "b"] {
                let g = c.member(id).unwrap().generation;
                c.ack(0, id, g);
            }
        }
        assert_eq!(c.state(), State::Stable);
        let a_parts = c.member("a").unwrap().told.clone();
        assert_eq!(a_parts.len(), 2);
        // a's stream ends: it stays (static), disconnected.
        assert!(c.disconnected(10, "a").is_empty());
        assert!(!c.member("a").unwrap().connected);
        // It comes back as a2 with the same instance: only a2 hears anything.
        let e = c.join(500, join("a2", Some("x"))).unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            matches!(&e[0], Effect::Assign { member, partitions, .. } if member == "a2" && partitions.iter().cloned().collect::<BTreeSet<_>>() == a_parts)
        );
        assert!(c.member("a").is_none());
        assert_eq!(c.check_commit("a", 99, []), Err(Refusal::UnknownMember));
        // Restored after a restart: disconnected, expiring a session after the restart.
        let mut r = Coordinator::restore(c.snapshot(), 10, 10_000);
        assert_eq!(r.member_count(), 2);
        assert!(r.members().all(|m| !m.connected));
        assert!(r.tick(10_999).is_empty());
        assert_eq!(r.tick(11_000).len(), 2);
    }
}
