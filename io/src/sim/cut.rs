//! What a power cut leaves: the durable state of every directory and file, plus what the cut
//! model lets survive of what was pending.

use std::collections::{BTreeMap, BTreeSet};

use super::{DirOp, Ino, Node, Pending, ROOT, SimRng};

/// How unsynced changes fare in a power cut.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CutModel {
    /// Sector size: writes tear only at multiples of it (512 or 4096).
    pub sector: u64,
    /// Probability that one pending change (a directory operation, a file write or one sector
    /// of it) survives. 0: everything unsynced is lost.
    pub keep: f64,
    /// Pending file writes survive sector by sector, independently of each other (reordered
    /// write-back); otherwise they survive in order, the first lost one torn at a sector
    /// boundary.
    pub reorder: bool,
}

impl CutModel {
    /// Everything unsynced is lost.
    pub const LOSE_UNSYNCED: CutModel = CutModel {
        sector: 4096,
        keep: 0.0,
        reorder: false,
    };

    /// One of the models of reliability-anchors §5 #2 (keep ∈ {0, 0.3} as `sync_probability`,
    /// sectors of 512 or 4096 bytes), plus 0.7 and reordering, picked by `rng`.
    pub fn random(rng: &mut SimRng) -> CutModel {
        CutModel {
            sector: *rng.pick(&[512, 4096]),
            keep: *rng.pick(&[0.0, 0.3, 0.3, 0.7]),
            reorder: rng.chance(0.5),
        }
    }
}

/// What a power cut did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Pending directory operations kept / lost.
    pub dir_ops_kept: u64,
    /// Pending directory operations lost.
    pub dir_ops_lost: u64,
    /// Pending file changes kept whole.
    pub writes_kept: u64,
    /// Pending file writes of which only some sectors survived.
    pub writes_torn: u64,
    /// Pending file changes lost entirely.
    pub writes_lost: u64,
    /// Files (and directories) that no surviving entry names any more.
    pub nodes_gone: u64,
}

/// Applies one change to a file image.
pub(super) fn apply(image: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write { pos, data } => write_at(image, *pos, data),
        Pending::SetLen(len) => image.resize(*len as usize, 0),
    }
}

fn write_at(image: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let end = pos as usize + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[pos as usize..end].copy_from_slice(data);
}

/// The sector-aligned pieces of a write: `(position, bytes)`.
fn pieces(pos: u64, data: &[u8], sector: u64) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let p = pos + at as u64;
        let next = (p / sector + 1) * sector;
        let n = ((next - p) as usize).min(data.len() - at);
        out.push((p, &data[at..at + n]));
        at += n;
    }
    out
}

fn apply_dir_op(entries: &mut BTreeMap<String, Ino>, op: &DirOp) {
    match op {
        DirOp::Link(name, ino) => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Unlink(name) => {
            entries.remove(name);
        }
        DirOp::Rename(from, to, ino) => {
            entries.remove(from);
            entries.insert(to.clone(), *ino);
        }
    }
}

/// Turns every node into what survives the cut and drops what nothing names any more.
pub(super) fn power_cut(
    nodes: &mut BTreeMap<Ino, Node>,
    model: &CutModel,
    rng: &mut SimRng,
) -> CutReport {
    let mut r = CutReport::default();
    for node in nodes.values_mut() {
        match node {
            Node::Dir(d) => {
                // A journal commits directory operations in order: a prefix survives.
                let ops = std::mem::take(&mut d.pending);
                let mut kept = 0;
                while kept < ops.len() && rng.chance(model.keep) {
                    kept += 1;
                }
                for op in &ops[..kept] {
                    apply_dir_op(&mut d.durable, op);
                }
                r.dir_ops_kept += kept as u64;
                r.dir_ops_lost += (ops.len() - kept) as u64;
                d.entries = d.durable.clone();
            }
            Node::File(f) => {
                let ops = std::mem::take(&mut f.pending);
                if model.reorder {
                    for op in &ops {
                        match op {
                            Pending::Write { pos, data } => {
                                let ps = pieces(*pos, data, model.sector);
                                let mut n = 0;
                                for (p, bytes) in &ps {
                                    if rng.chance(model.keep) {
                                        write_at(&mut f.durable, *p, bytes);
                                        n += 1;
                                    }
                                }
                                match n {
                                    0 => r.writes_lost += 1,
                                    n if n == ps.len() => r.writes_kept += 1,
                                    _ => r.writes_torn += 1,
                                }
                            }
                            Pending::SetLen(_) => {
                                if rng.chance(model.keep) {
                                    apply(&mut f.durable, op);
                                    r.writes_kept += 1;
                                } else {
                                    r.writes_lost += 1;
                                }
                            }
                        }
                    }
                } else {
                    let mut i = 0;
                    while i < ops.len() && rng.chance(model.keep) {
                        apply(&mut f.durable, &ops[i]);
                        i += 1;
                    }
                    r.writes_kept += i as u64;
                    if let Some(Pending::Write { pos, data }) = ops.get(i) {
                        // The first write that did not make it whole: torn at a sector.
                        let ps = pieces(*pos, data, model.sector);
                        let n = rng.below(ps.len() as u64) as usize;
                        for (p, bytes) in &ps[..n] {
                            write_at(&mut f.durable, *p, bytes);
                        }
                        if n > 0 {
                            r.writes_torn += 1;
                            i += 1;
                        }
                    }
                    r.writes_lost += (ops.len() - i) as u64;
                }
                f.data = f.durable.clone();
            }
        }
    }
    // Whatever no surviving entry reaches is gone.
    let mut reachable = BTreeSet::new();
    let mut stack = vec![ROOT];
    while let Some(ino) = stack.pop() {
        if !reachable.insert(ino) {
            continue;
        }
        if let Some(Node::Dir(d)) = nodes.get(&ino) {
            stack.extend(d.entries.values().copied());
        }
    }
    let before = nodes.len();
    nodes.retain(|ino, _| reachable.contains(ino));
    r.nodes_gone = (before - nodes.len()) as u64;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_sector_boundaries() {
        let data = vec![7u8; 1300];
        let ps = pieces(100, &data, 512);
        let spans: Vec<_> = ps.iter().map(|(p, b)| (*p, b.len())).collect();
        assert_eq!(spans, vec![(100, 412), (512, 512), (1024, 376)]);
    }
}
