//! A simulated disk for tests: an in-memory file system that keeps what was written apart
//! from what was synced, per file and per directory entry, and produces what a power cut
//! leaves behind.
//!
//! Model (stricter than ext4, as POSIX allows):
//! - A file's bytes and size are durable only up to its last `sync_data`/`sync_all`; later
//!   writes and truncations are *pending*.
//! - A directory entry (create, rename, remove, mkdir) is durable only once its directory was
//!   synced (`sync_dir`); until then it is a pending operation of that directory. Syncing a
//!   file does not make its name durable.
//! - [`SimFs::cut`] (or an armed [`SimFs::cut_before`]) is the power cut: from then on every
//!   operation fails, handles included, until [`SimFs::restart`] computes what the disk holds
//!   under a [`CutModel`]: each directory keeps its durable entries plus a random prefix of its
//!   pending operations (a journal commits them in order); each file keeps its durable bytes
//!   plus, depending on the model, nothing, a prefix of its pending writes with the first lost
//!   one torn at a sector boundary, or any subset of their sectors (reordered writes). Holes
//!   read as zeros. Files no surviving entry names are gone.
//! - Faults ([`Fault`]): an operation chosen by kind, path and occurrence fails with an errno
//!   (EIO, ENOSPC, EMFILE, …) or, for syncs, is silently skipped (the negative controls: a
//!   missing fsync). A capacity makes writes past it fail with ENOSPC after writing what fits;
//!   an open-files limit makes opens fail with EMFILE. [`SimFs::flip_bit`] damages synced data.
//! - Reads through [`FileHandle::map`] return a copy of the bytes as they are now; the engine
//!   never changes a range it has mapped, so a copy reads the same as a memory map would.
//!   (Decision recorded in `docs/durability.md`, "How this is tested".)
//!
//! Every mutating operation has a number ([`SimFs::ops`]); a power cut can be armed before any
//! of them, which makes every step of every protocol a possible cut point. Everything is
//! deterministic: the same operations and the same [`SimRng`] seed give the same disk.

mod cut;
mod rng;

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

pub use cut::{CutModel, CutReport};
pub use rng::SimRng;

use crate::{DirEntry, FdBudget, FileHandle, FileLock, FileSystem, Metadata, OpenMode};

type Ino = u64;
const ROOT: Ino = 1;
/// How many recent operations [`SimFs::recent_ops`] keeps.
const RECENT: usize = 64;

/// Kinds of operations, for faults and statistics. All but `Open`, `Read` and `List` change
/// the disk, have a number and can be a cut point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// Opening an existing file (or a directory for listing or syncing).
    Open,
    /// Reading a file (`read_at`, `map`, `len`).
    Read,
    /// Listing a directory or asking for metadata.
    List,
    /// Creating a file.
    Create,
    /// Writing to a file.
    Write,
    /// Truncating or extending a file.
    SetLen,
    /// `fdatasync` of a file.
    SyncData,
    /// `fsync` of a file.
    SyncAll,
    /// Creating a directory.
    Mkdir,
    /// Renaming.
    Rename,
    /// Removing a file or a directory entry.
    Remove,
    /// `fsync` of a directory.
    SyncDir,
}

impl OpKind {
    /// True for operations that change the disk (numbered, cut points).
    pub fn mutates(self) -> bool {
        !matches!(self, OpKind::Open | OpKind::Read | OpKind::List)
    }

    /// True for the syncs.
    pub fn is_sync(self) -> bool {
        matches!(self, OpKind::SyncData | OpKind::SyncAll | OpKind::SyncDir)
    }
}

/// Where a power cut happened: before mutating operation number `op`, of kind `kind` on
/// `path` (`kind` is `None` for a cut between operations, [`SimFs::cut`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutPoint {
    /// The operation's number.
    pub op: u64,
    /// What it was.
    pub kind: Option<OpKind>,
    /// On what.
    pub path: PathBuf,
}

impl CutPoint {
    /// What the cut fell on, with numbers in names replaced by `N` (segment bases, partition
    /// directories, positions) and the topic kept only when it is an internal one (its name
    /// starts with `__`): `"SyncData __consumer_offsets/N/N.log"`, `"Rename N/N.index.tmp"`,
    /// `"between operations"`. For per-file statistics of the power-cut loops.
    pub fn class(&self) -> String {
        let Some(kind) = self.kind else {
            return "between operations".into();
        };
        let mut parts: Vec<String> = Vec::new();
        let comps: Vec<String> = self
            .path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        // Skip the log's root; keep the last three components at most.
        for c in comps.iter().skip(1).rev().take(3).rev() {
            if c.starts_with("__") {
                parts.push(c.clone());
                continue;
            }
            let mut out = String::new();
            for ch in c.chars() {
                if ch.is_ascii_digit() {
                    if !out.ends_with('N') {
                        out.push('N');
                    }
                } else {
                    out.push(ch);
                }
            }
            parts.push(out);
        }
        format!("{kind:?} {}", parts.join("/"))
    }
}

/// What a [`Fault`] does to the operation it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The operation fails with this errno (`libc::EIO`, `libc::ENOSPC`, …) and changes
    /// nothing.
    Fail(i32),
    /// The operation reports success and does nothing (a sync that was never called).
    Skip,
}

type Matcher = Box<dyn Fn(OpKind, &Path) -> bool + Send>;

/// A fault: the operations it matches, how many matches pass first, how many it hits.
pub struct Fault {
    matches: Matcher,
    skip: u64,
    times: u64,
    effect: Effect,
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault")
            .field("skip", &self.skip)
            .field("times", &self.times)
            .field("effect", &self.effect)
            .finish_non_exhaustive()
    }
}

impl Fault {
    /// A fault hitting every operation for which `matches(kind, path)` is true.
    pub fn when(matches: impl Fn(OpKind, &Path) -> bool + Send + 'static, effect: Effect) -> Fault {
        Fault {
            matches: Box::new(matches),
            skip: 0,
            times: u64::MAX,
            effect,
        }
    }

    /// Operations of `kind` on a path containing `part`.
    pub fn on(kind: OpKind, part: &str, effect: Effect) -> Fault {
        let part = part.to_owned();
        Fault::when(
            move |k, p| k == kind && p.to_string_lossy().contains(&part),
            effect,
        )
    }

    /// Lets the first `n` matching operations pass.
    pub fn after(mut self, n: u64) -> Fault {
        self.skip = n;
        self
    }

    /// Hits at most `n` operations (then lets everything pass).
    pub fn times(mut self, n: u64) -> Fault {
        self.times = n;
        self
    }
}

#[derive(Debug)]
enum Pending {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileNode {
    /// What the process sees.
    data: Vec<u8>,
    /// What survives any power cut.
    durable: Vec<u8>,
    /// Changes since `durable`, in order.
    pending: Vec<Pending>,
}

#[derive(Debug)]
enum DirOp {
    Link(String, Ino),
    Unlink(String),
    Rename(String, String, Ino),
}

#[derive(Debug, Default)]
struct DirNode {
    entries: BTreeMap<String, Ino>,
    durable: BTreeMap<String, Ino>,
    pending: Vec<DirOp>,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug)]
struct Disk {
    nodes: BTreeMap<Ino, Node>,
    next_ino: Ino,
    /// Bumped by every restart; handles of an older generation are dead.
    epoch: u64,
    /// Power is off (cut, not restarted yet).
    down: bool,
    ops: u64,
    cut_at: Option<u64>,
    /// Where the last cut happened.
    cut_point: Option<CutPoint>,
    faults: Vec<Fault>,
    /// Open handles per inode (current generation).
    handles: BTreeMap<Ino, u64>,
    fd_limit: Option<u64>,
    capacity: Option<u64>,
    locks: BTreeSet<Ino>,
    recent: VecDeque<String>,
    counts: BTreeMap<OpKind, u64>,
}

/// The simulated disk. Share it as `Arc<SimFs>`; [`SimFs::fs`] gives the engine's view.
#[derive(Debug, Clone)]
pub struct SimFs {
    disk: Arc<Mutex<Disk>>,
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

fn power_off() -> io::Error {
    io::Error::other("simulated power cut: the disk is gone")
}

fn not_found() -> io::Error {
    err(libc::ENOENT)
}

/// A path as its normal components (`.` dropped; `..` refused).
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the simulated disk does not resolve `..`",
                ));
            }
        }
    }
    Ok(out)
}

impl Disk {
    fn dir(&self, ino: Ino) -> io::Result<&DirNode> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(err(libc::ENOTDIR)),
            None => Err(not_found()),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(err(libc::ENOTDIR)),
            None => Err(not_found()),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(Node::Dir(_)) => Err(err(libc::EISDIR)),
            None => Err(err(libc::ESTALE)),
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<Ino> {
        let mut ino = ROOT;
        for c in components(path)? {
            ino = *self.dir(ino)?.entries.get(&c).ok_or_else(not_found)?;
        }
        Ok(ino)
    }

    /// The parent directory's inode and the last component.
    fn parent(&self, path: &Path) -> io::Result<(Ino, String)> {
        let mut comps = components(path)?;
        let name = comps.pop().ok_or_else(|| err(libc::EINVAL))?;
        let mut ino = ROOT;
        for c in comps {
            ino = *self.dir(ino)?.entries.get(&c).ok_or_else(not_found)?;
        }
        self.dir(ino)?;
        Ok((ino, name))
    }

    /// The start of every operation: power, cut point, faults, numbering. Returns `Ok(true)`
    /// to go on, `Ok(false)` when a fault says to skip it (report success).
    fn begin(&mut self, kind: OpKind, path: &Path) -> io::Result<bool> {
        if self.down {
            return Err(power_off());
        }
        let what = format!("#{} {kind:?} {}", self.ops, path.display());
        if kind.mutates() {
            if self.cut_at.is_some_and(|at| self.ops >= at) {
                self.cut_point = Some(CutPoint {
                    op: self.ops,
                    kind: Some(kind),
                    path: path.to_path_buf(),
                });
                self.down = true;
                return Err(power_off());
            }
            self.ops += 1;
            *self.counts.entry(kind).or_default() += 1;
        }
        let mut effect = None;
        for f in &mut self.faults {
            if f.times == 0 || !(f.matches)(kind, path) {
                continue;
            }
            if f.skip > 0 {
                f.skip -= 1;
                continue;
            }
            f.times -= 1;
            effect = Some(f.effect);
            break;
        }
        if kind.mutates() || effect.is_some() {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(match effect {
                Some(e) => format!("{what} -> {e:?}"),
                None => what,
            });
        }
        match effect {
            Some(Effect::Fail(errno)) => Err(err(errno)),
            Some(Effect::Skip) => Ok(false),
            None => Ok(true),
        }
    }

    fn open_count(&self) -> u64 {
        self.handles.values().sum::<u64>() + self.locks.len() as u64
    }

    /// EMFILE when the open-files limit is reached.
    fn check_fd(&self) -> io::Result<()> {
        match self.fd_limit {
            Some(limit) if self.open_count() >= limit => Err(err(libc::EMFILE)),
            _ => Ok(()),
        }
    }

    fn new_node(&mut self, node: Node) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn link(&mut self, dir: Ino, name: String, ino: Ino) -> io::Result<()> {
        let d = self.dir_mut(dir)?;
        d.entries.insert(name.clone(), ino);
        d.pending.push(DirOp::Link(name, ino));
        Ok(())
    }

    /// Bytes of file data the process can still reach (named or open).
    fn used(&self) -> u64 {
        let mut seen = BTreeSet::new();
        let mut stack = vec![ROOT];
        stack.extend(self.handles.keys().copied());
        let mut total = 0;
        while let Some(ino) = stack.pop() {
            if !seen.insert(ino) {
                continue;
            }
            match self.nodes.get(&ino) {
                Some(Node::File(f)) => total += f.data.len() as u64,
                Some(Node::Dir(d)) => stack.extend(d.entries.values().copied()),
                None => {}
            }
        }
        total
    }

    fn write(&mut self, ino: Ino, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut buf = buf;
        let mut short = false;
        if let Some(cap) = self.capacity {
            let len = self.file_mut(ino)?.data.len() as u64;
            let grow = (pos + buf.len() as u64).saturating_sub(len);
            let free = cap.saturating_sub(self.used());
            if grow > free {
                // Like the kernel: write what fits, then refuse.
                let fits = (len + free).saturating_sub(pos).min(buf.len() as u64);
                buf = &buf[..fits as usize];
                short = true;
            }
        }
        if !buf.is_empty() {
            let f = self.file_mut(ino)?;
            let end = pos as usize + buf.len();
            if f.data.len() < end {
                f.data.resize(end, 0);
            }
            f.data[pos as usize..end].copy_from_slice(buf);
            f.pending.push(Pending::Write {
                pos,
                data: buf.to_vec(),
            });
        }
        if short {
            Err(err(libc::ENOSPC))
        } else {
            Ok(())
        }
    }

    fn set_len(&mut self, ino: Ino, len: u64) -> io::Result<()> {
        if let Some(cap) = self.capacity {
            let cur = self.file_mut(ino)?.data.len() as u64;
            if len > cur && len - cur > cap.saturating_sub(self.used()) {
                return Err(err(libc::ENOSPC));
            }
        }
        let f = self.file_mut(ino)?;
        f.data.resize(len as usize, 0);
        f.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync_file(&mut self, ino: Ino) -> io::Result<()> {
        let f = self.file_mut(ino)?;
        for p in std::mem::take(&mut f.pending) {
            cut::apply(&mut f.durable, &p);
        }
        debug_assert_eq!(f.durable, f.data);
        Ok(())
    }

    fn unlink(&mut self, dir: Ino, name: &str) -> io::Result<Ino> {
        let d = self.dir_mut(dir)?;
        let ino = d.entries.remove(name).ok_or_else(not_found)?;
        d.pending.push(DirOp::Unlink(name.to_owned()));
        Ok(ino)
    }

    fn remove_tree(&mut self, dir: Ino, name: &str) -> io::Result<()> {
        let ino = *self.dir(dir)?.entries.get(name).ok_or_else(not_found)?;
        if let Some(Node::Dir(d)) = self.nodes.get(&ino) {
            let children: Vec<String> = d.entries.keys().cloned().collect();
            for c in children {
                self.remove_tree(ino, &c)?;
            }
        }
        self.unlink(dir, name)?;
        Ok(())
    }
}

/// A handle: dead once the power was cut (its generation is over).
#[derive(Debug)]
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    ino: Ino,
    epoch: u64,
    writable: bool,
    path: PathBuf,
}

impl SimFile {
    fn disk(&self, kind: OpKind) -> io::Result<(MutexGuard<'_, Disk>, bool)> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        if d.epoch != self.epoch {
            return Err(power_off());
        }
        let go = d.begin(kind, &self.path)?;
        Ok((d, go))
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        if d.epoch == self.epoch
            && let Some(n) = d.handles.get_mut(&self.ino)
        {
            *n -= 1;
            if *n == 0 {
                d.handles.remove(&self.ino);
            }
        }
    }
}

struct MapOwner {
    data: Vec<u8>,
    _keep_alive: Box<dyn Any + Send + Sync>,
}

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl FileHandle for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let (mut d, _) = self.disk(OpKind::Read)?;
        let f = d.file_mut(self.ino)?;
        let start = (pos as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        if !self.writable {
            return Err(err(libc::EBADF));
        }
        let (mut d, go) = self.disk(OpKind::Write)?;
        if go {
            d.write(self.ino, buf, pos)
        } else {
            Ok(())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(err(libc::EINVAL));
        }
        let (mut d, go) = self.disk(OpKind::SetLen)?;
        if go { d.set_len(self.ino, len) } else { Ok(()) }
    }

    fn size(&self) -> io::Result<u64> {
        let (mut d, _) = self.disk(OpKind::Read)?;
        Ok(d.file_mut(self.ino)?.data.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let (mut d, go) = self.disk(OpKind::SyncData)?;
        if go { d.sync_file(self.ino) } else { Ok(()) }
    }

    fn sync_all(&self) -> io::Result<()> {
        let (mut d, go) = self.disk(OpKind::SyncAll)?;
        if go { d.sync_file(self.ino) } else { Ok(()) }
    }

    fn map(&self, len: usize, keep_alive: Box<dyn Any + Send + Sync>) -> io::Result<Bytes> {
        let (mut d, _) = self.disk(OpKind::Read)?;
        let f = d.file_mut(self.ino)?;
        if len > f.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mapping {len} bytes of a {}-byte file (a real map would fault)",
                    f.data.len()
                ),
            ));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        Ok(Bytes::from_owner(MapOwner {
            data: f.data[..len].to_vec(),
            _keep_alive: keep_alive,
        }))
    }
}

#[derive(Debug)]
struct SimLock {
    disk: Arc<Mutex<Disk>>,
    ino: Ino,
    epoch: u64,
}

impl FileLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        if d.epoch == self.epoch {
            d.locks.remove(&self.ino);
        }
    }
}

impl Default for SimFs {
    fn default() -> Self {
        SimFs::new()
    }
}

impl SimFs {
    /// An empty disk (just `/`), powered on.
    pub fn new() -> SimFs {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        SimFs {
            disk: Arc::new(Mutex::new(Disk {
                nodes,
                next_ino: ROOT + 1,
                epoch: 0,
                down: false,
                ops: 0,
                cut_at: None,
                cut_point: None,
                faults: Vec::new(),
                handles: BTreeMap::new(),
                fd_limit: None,
                capacity: None,
                locks: BTreeSet::new(),
                recent: VecDeque::new(),
                counts: BTreeMap::new(),
            })),
        }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine's view of this disk.
    pub fn fs(&self) -> Arc<dyn FileSystem> {
        Arc::new(self.clone())
    }

    /// Mutating operations so far (the next one gets this number).
    pub fn ops(&self) -> u64 {
        self.disk().ops
    }

    /// Mutating operations so far, by kind.
    pub fn op_counts(&self) -> BTreeMap<OpKind, u64> {
        self.disk().counts.clone()
    }

    /// Arms a power cut just before mutating operation number `op` (see [`SimFs::ops`]).
    pub fn cut_before(&self, op: u64) {
        self.disk().cut_at = Some(op);
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        let mut d = self.disk();
        if !d.down {
            d.down = true;
            d.cut_point = Some(CutPoint {
                op: d.ops,
                kind: None,
                path: PathBuf::new(),
            });
        }
    }

    /// True while the power is off.
    pub fn is_down(&self) -> bool {
        self.disk().down
    }

    /// Where the last cut happened.
    pub fn cut_point(&self) -> Option<CutPoint> {
        self.disk().cut_point.clone()
    }

    /// The last operations (numbered mutations and faulted operations), oldest first.
    pub fn recent_ops(&self) -> Vec<String> {
        self.disk().recent.iter().cloned().collect()
    }

    /// Adds a fault (see [`Fault`]); faults are tried in the order they were added.
    pub fn inject(&self, fault: Fault) {
        self.disk().faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.disk().faults.clear();
    }

    /// Limits the bytes of file data (ENOSPC past it); `None`: unlimited.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.disk().capacity = bytes;
    }

    /// Limits open handles (EMFILE past it); `None`: unlimited.
    pub fn set_fd_limit(&self, limit: Option<u64>) {
        self.disk().fd_limit = limit;
    }

    /// Handles open now.
    pub fn open_handles(&self) -> u64 {
        self.disk().open_count()
    }

    /// Bytes of file data in use.
    pub fn used(&self) -> u64 {
        self.disk().used()
    }

    /// Power back on after a cut (cutting first if the power is still on): every directory
    /// and file becomes what the cut left under `model` (random choices from `rng`), every
    /// handle and lock of before is dead, faults and the armed cut are cleared.
    pub fn restart(&self, model: &CutModel, rng: &mut SimRng) -> CutReport {
        let mut d = self.disk();
        let report = cut::power_cut(&mut d.nodes, model, rng);
        let epoch = d.epoch + 1;
        d.epoch = epoch;
        d.down = false;
        d.cut_at = None;
        d.faults.clear();
        d.handles.clear();
        d.locks.clear();
        report
    }

    /// Flips bit `bit` (0–7) of byte `pos` of the file `path`, in what was synced and in what
    /// the process sees: damage to data at rest.
    pub fn flip_bit(&self, path: &Path, pos: u64, bit: u8) -> io::Result<()> {
        let mut d = self.disk();
        let ino = d.lookup(path)?;
        let f = d.file_mut(ino)?;
        let (pos, mask) = (pos as usize, 1u8 << (bit & 7));
        if pos >= f.durable.len() || pos >= f.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "flip past the synced end",
            ));
        }
        f.durable[pos] ^= mask;
        f.data[pos] ^= mask;
        Ok(())
    }

    /// Every file under `dir` whose name survives a power cut for sure (durable entries all
    /// the way down), with the length of its synced bytes; sorted by path.
    pub fn durable_files(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        let d = self.disk();
        let mut out = Vec::new();
        let mut ino = ROOT;
        let mut base = PathBuf::from("/");
        if let Ok(comps) = components(dir) {
            for c in comps {
                match d.dir(ino).ok().and_then(|n| n.durable.get(&c)) {
                    Some(&i) => {
                        ino = i;
                        base.push(c);
                    }
                    None => return out,
                }
            }
        }
        let mut stack = vec![(ino, base)];
        while let Some((ino, path)) = stack.pop() {
            match d.nodes.get(&ino) {
                Some(Node::Dir(n)) => {
                    for (name, &child) in &n.durable {
                        stack.push((child, path.join(name)));
                    }
                }
                Some(Node::File(f)) => out.push((path, f.durable.len() as u64)),
                None => {}
            }
        }
        out.sort();
        out
    }

    /// A listing of the tree as the process sees it (for failure messages).
    pub fn tree(&self) -> String {
        let d = self.disk();
        let mut out = String::new();
        let mut stack = vec![(ROOT, String::from("/"))];
        while let Some((ino, path)) = stack.pop() {
            match d.nodes.get(&ino) {
                Some(Node::Dir(n)) => {
                    out.push_str(&format!("{path}/ ({} pending)\n", n.pending.len()));
                    for (name, &child) in n.entries.iter().rev() {
                        stack.push((child, format!("{}/{name}", path.trim_end_matches('/'))));
                    }
                }
                Some(Node::File(f)) => out.push_str(&format!(
                    "{path} {} bytes ({} synced, {} pending)\n",
                    f.data.len(),
                    f.durable.len(),
                    f.pending.len()
                )),
                None => {}
            }
        }
        out
    }
}

impl FileSystem for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>> {
        let mut d = self.disk();
        if d.down {
            return Err(power_off());
        }
        d.check_fd()?;
        let existing = d.lookup(path);
        let ino = match (mode, existing) {
            (OpenMode::CreateNew, Ok(_)) => return Err(err(libc::EEXIST)),
            (OpenMode::Read | OpenMode::Write, Err(e)) => {
                d.begin(OpKind::Open, path)?;
                return Err(e);
            }
            (OpenMode::Read | OpenMode::Write | OpenMode::Create, Ok(ino)) => {
                d.begin(OpKind::Open, path)?;
                ino
            }
            (OpenMode::CreateTruncate, Ok(ino)) => {
                if matches!(d.nodes.get(&ino), Some(Node::Dir(_))) {
                    return Err(err(libc::EISDIR));
                }
                if d.begin(OpKind::SetLen, path)? {
                    d.set_len(ino, 0)?;
                }
                ino
            }
            (_, Err(_)) => {
                let (parent, name) = d.parent(path)?;
                d.begin(OpKind::Create, path)?;
                let ino = d.new_node(Node::File(FileNode::default()));
                d.link(parent, name, ino)?;
                ino
            }
        };
        if mode.writes() && matches!(d.nodes.get(&ino), Some(Node::Dir(_))) {
            return Err(err(libc::EISDIR));
        }
        *d.handles.entry(ino).or_default() += 1;
        Ok(Arc::new(SimFile {
            disk: self.disk.clone(),
            ino,
            epoch: d.epoch,
            writable: mode.writes(),
            path: path.to_path_buf(),
        }))
    }

    fn metadata(&self, path: &Path) -> io::Result<Metadata> {
        let mut d = self.disk();
        d.begin(OpKind::List, path)?;
        let ino = d.lookup(path)?;
        Ok(match d.nodes.get(&ino) {
            Some(Node::File(f)) => Metadata {
                len: f.data.len() as u64,
                is_dir: false,
            },
            Some(Node::Dir(_)) => Metadata {
                len: 0,
                is_dir: true,
            },
            None => return Err(not_found()),
        })
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut d = self.disk();
        d.begin(OpKind::List, path)?;
        d.check_fd()?;
        let ino = d.lookup(path)?;
        let dir = d.dir(ino)?;
        Ok(dir
            .entries
            .iter()
            .map(|(name, child)| DirEntry {
                name: name.clone(),
                is_dir: matches!(d.nodes.get(child), Some(Node::Dir(_))),
            })
            .collect())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut d = self.disk();
        if d.down {
            return Err(power_off());
        }
        if d.lookup(path).is_ok() {
            return Err(err(libc::EEXIST));
        }
        let (parent, name) = d.parent(path)?;
        if d.begin(OpKind::Mkdir, path)? {
            let ino = d.new_node(Node::Dir(DirNode::default()));
            d.link(parent, name, ino)?;
        }
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut p = PathBuf::from("/");
        for c in components(path)? {
            p.push(c);
            match self.create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    if !self.metadata(&p)?.is_dir {
                        return Err(err(libc::ENOTDIR));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.disk();
        if d.down {
            return Err(power_off());
        }
        let (fdir, fname) = d.parent(from)?;
        let ino = *d.dir(fdir)?.entries.get(&fname).ok_or_else(not_found)?;
        let (tdir, tname) = d.parent(to)?;
        if let Some(&old) = d.dir(tdir)?.entries.get(&tname)
            && let Some(Node::Dir(od)) = d.nodes.get(&old)
            && !od.entries.is_empty()
        {
            return Err(err(libc::ENOTEMPTY));
        }
        if !d.begin(OpKind::Rename, to)? {
            return Ok(());
        }
        if fdir == tdir {
            let dir = d.dir_mut(fdir)?;
            dir.entries.remove(&fname);
            dir.entries.insert(tname.clone(), ino);
            dir.pending.push(DirOp::Rename(fname, tname, ino));
        } else {
            d.unlink(fdir, &fname)?;
            d.link(tdir, tname, ino)?;
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut d = self.disk();
        if d.down {
            return Err(power_off());
        }
        let (dir, name) = d.parent(path)?;
        let ino = *d.dir(dir)?.entries.get(&name).ok_or_else(not_found)?;
        if matches!(d.nodes.get(&ino), Some(Node::Dir(_))) {
            return Err(err(libc::EISDIR));
        }
        if d.begin(OpKind::Remove, path)? {
            d.unlink(dir, &name)?;
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // One entry at a time, deepest first, each its own operation (as the real one does).
        {
            let d = self.disk();
            if d.down {
                return Err(power_off());
            }
            d.dir(d.lookup(path)?)?;
        }
        let mut order = Vec::new();
        self.collect_tree(path, &mut order)?;
        order.push(path.to_path_buf());
        for p in order {
            let mut d = self.disk();
            let (parent, n) = d.parent(&p)?;
            if d.begin(OpKind::Remove, &p)? {
                d.remove_tree(parent, &n)?;
            }
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut d = self.disk();
        if d.down {
            return Err(power_off());
        }
        d.check_fd()?;
        let ino = d.lookup(path)?;
        d.dir(ino)?;
        if d.begin(OpKind::SyncDir, path)? {
            let dir = d.dir_mut(ino)?;
            dir.durable = dir.entries.clone();
            dir.pending.clear();
        }
        Ok(())
    }

    fn lock(&self, path: &Path, create: bool) -> io::Result<Option<Box<dyn FileLock>>> {
        let ino = {
            let d = self.disk();
            if d.down {
                return Err(power_off());
            }
            d.lookup(path)
        };
        let ino = match ino {
            Ok(ino) => ino,
            Err(_) if !create => return Ok(None),
            Err(_) => {
                // Created like any file (a numbered operation), then closed.
                self.open(path, OpenMode::Create)?;
                self.disk().lookup(path)?
            }
        };
        let mut d = self.disk();
        d.check_fd()?;
        if !d.locks.insert(ino) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Some(Box::new(SimLock {
            disk: self.disk.clone(),
            ino,
            epoch: d.epoch,
        })))
    }

    fn fd_budget(&self) -> Option<FdBudget> {
        let d = self.disk();
        Some(FdBudget {
            open: d.open_count(),
            limit: d.fd_limit.unwrap_or(u64::MAX),
        })
    }
}

impl SimFs {
    /// Every path under `dir`, children before their directory.
    fn collect_tree(&self, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        let entries = {
            let d = self.disk();
            let ino = d.lookup(dir)?;
            d.dir(ino)?
                .entries
                .iter()
                .map(|(n, c)| (n.clone(), matches!(d.nodes.get(c), Some(Node::Dir(_)))))
                .collect::<Vec<_>>()
        };
        for (name, is_dir) in entries {
            let p = dir.join(name);
            if is_dir {
                self.collect_tree(&p, out)?;
            }
            out.push(p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
