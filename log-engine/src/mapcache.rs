//! Bound on live memory maps of sealed segments ([`crate::Limits::max_mapped_segments`]).
//!
//! Every mapping use bumps a tick on the segment; when a new mapping would exceed the limit,
//! the least recently used sealed segment is unmapped. Readers that still hold slices of it
//! keep that mapping alive until they drop them, so eviction never invalidates data handed out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::segment::Segment;

#[derive(Debug)]
pub(crate) struct MapCache {
    tick: AtomicU64,
    max: usize,
    mapped: Mutex<Vec<Weak<Segment>>>,
}

impl MapCache {
    pub(crate) fn new(max: usize) -> MapCache {
        MapCache {
            tick: AtomicU64::new(1),
            max: max.max(1),
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// Records a use of `seg`'s mapping; `newly_mapped` when the use created it.
    pub(crate) fn touch(&self, seg: &Arc<Segment>, newly_mapped: bool) {
        seg.last_used
            .store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        if !newly_mapped {
            return;
        }
        let mut victims = Vec::new();
        {
            let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|w| w.upgrade().is_some_and(|s| s.is_mapped()));
            if !m.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(seg))) {
                m.push(Arc::downgrade(seg));
            }
            while m.len() > self.max {
                let oldest = m
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(seg)))
                    .min_by_key(|(_, w)| {
                        w.upgrade()
                            .map_or(0, |s| s.last_used.load(Ordering::Relaxed))
                    })
                    .map(|(i, _)| i);
                let Some(i) = oldest else { break };
                victims.push(m.swap_remove(i));
            }
        }
        for v in victims.into_iter().filter_map(|w| w.upgrade()) {
            v.unmap();
        }
    }

    /// Number of tracked mappings (for stats and tests).
    pub(crate) fn len(&self) -> usize {
        let m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|w| w.upgrade().is_some_and(|s| s.is_mapped()))
            .count()
    }
}
