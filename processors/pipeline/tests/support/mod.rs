//! Test support for the pipeline's integration tests: HTTP receivers and the oracle.
#![allow(dead_code, unreachable_pub)]

pub mod oracle;
pub mod procs;
pub mod receiver;

use std::collections::BTreeSet;
use std::fmt::Debug;

/// Asserts two sets are equal, reporting sizes and a few differences (not both sets).
pub fn assert_same_set<T: Ord + Debug + Clone>(what: &str, got: &BTreeSet<T>, want: &BTreeSet<T>) {
    if got == want {
        return;
    }
    let missing: Vec<_> = want.difference(got).take(5).collect();
    let extra: Vec<_> = got.difference(want).take(5).collect();
    panic!(
        "{what}: got {} want {}; missing {} (e.g. {missing:?}), unexpected {} (e.g. {extra:?})",
        got.len(),
        want.len(),
        want.difference(got).count(),
        got.difference(want).count()
    );
}

/// Flattens `address -> ids` into `(address, id)` pairs.
pub fn pairs(
    m: &std::collections::BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<(String, String)> {
    m.iter()
        .flat_map(|(a, ids)| ids.iter().map(move |i| (a.clone(), i.clone())))
        .collect()
}
