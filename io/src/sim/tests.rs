//! The simulated disk's own model, checked operation by operation.

use std::path::Path;

use super::*;

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn content(fs: &SimFs, path: &str) -> Option<Vec<u8>> {
    fs.read(p(path)).ok()
}

fn lose_all() -> (CutModel, SimRng) {
    (CutModel::LOSE_UNSYNCED, SimRng::new(1))
}

#[test]
fn a_synced_file_whose_directory_was_not_synced_vanishes() {
    let fs = SimFs::new();
    fs.create_dir(p("/d")).unwrap();
    fs.sync_dir(p("/")).unwrap();
    let f = fs.open(p("/d/seg"), OpenMode::CreateNew).unwrap();
    f.write_all_at(b"acked", 0).unwrap();
    f.sync_data().unwrap();
    let (m, mut rng) = lose_all();
    fs.restart(&m, &mut rng);
    assert_eq!(content(&fs, "/d/seg"), None, "{}", fs.tree());

    // With the directory synced it survives, and so does exactly what was synced.
    let f = fs.open(p("/d/seg"), OpenMode::CreateNew).unwrap();
    f.write_all_at(b"acked", 0).unwrap();
    f.sync_data().unwrap();
    fs.sync_dir(p("/d")).unwrap();
    f.write_all_at(b" and not", 5).unwrap();
    assert_eq!(content(&fs, "/d/seg").unwrap(), b"acked and not");
    fs.restart(&m, &mut rng);
    assert_eq!(content(&fs, "/d/seg").unwrap(), b"acked");
}

#[test]
fn a_rename_needs_its_directory_synced() {
    let fs = SimFs::new();
    for (name, body) in [("/cfg", &b"old"[..]), ("/cfg.tmp", &b"new"[..])] {
        let f = fs.open(p(name), OpenMode::CreateNew).unwrap();
        f.write_all_at(body, 0).unwrap();
        f.sync_data().unwrap();
    }
    fs.sync_dir(p("/")).unwrap();
    fs.rename(p("/cfg.tmp"), p("/cfg")).unwrap();
    assert_eq!(content(&fs, "/cfg").unwrap(), b"new");
    let (m, mut rng) = lose_all();
    fs.restart(&m, &mut rng);
    assert_eq!(content(&fs, "/cfg").unwrap(), b"old");
    assert_eq!(content(&fs, "/cfg.tmp").unwrap(), b"new");
    fs.rename(p("/cfg.tmp"), p("/cfg")).unwrap();
    fs.sync_dir(p("/")).unwrap();
    fs.restart(&m, &mut rng);
    assert_eq!(content(&fs, "/cfg").unwrap(), b"new");
    assert_eq!(content(&fs, "/cfg.tmp"), None);
}

#[test]
fn unsynced_writes_survive_as_a_prefix_torn_at_a_sector_or_reordered() {
    // 6 pending writes of 1000 bytes after 100 synced bytes; every outcome must be the synced
    // bytes plus whole sectors of the pending writes (zeros elsewhere), and in order mode a
    // prefix of them.
    let mut seen_torn = false;
    let mut seen_gap = false;
    for seed in 0..300 {
        let fs = SimFs::new();
        let f = fs.open(p("/f"), OpenMode::CreateNew).unwrap();
        fs.sync_dir(p("/")).unwrap();
        f.write_all_at(&[0xAA; 100], 0).unwrap();
        f.sync_data().unwrap();
        let mut full = vec![0xAA; 100];
        for i in 0..6u8 {
            let chunk = vec![i + 1; 1000];
            f.write_all_at(&chunk, full.len() as u64).unwrap();
            full.extend_from_slice(&chunk);
        }
        let mut rng = SimRng::new(seed);
        let model = CutModel {
            sector: 512,
            keep: 0.6,
            reorder: seed % 2 == 1,
        };
        fs.restart(&model, &mut rng);
        let got = content(&fs, "/f").unwrap();
        assert!(got.len() <= full.len());
        assert_eq!(&got[..100], &full[..100], "synced bytes are kept");
        // Each piece (one write's bytes within one sector) is all there or all zeros.
        for w in 0..6u64 {
            let (start, end) = (100 + w * 1000, 100 + (w + 1) * 1000);
            let mut at = start;
            while at < end {
                let next = ((at / 512 + 1) * 512).min(end);
                let (a, b) = (at as usize, (next as usize).min(got.len()));
                if a < b {
                    let piece = &got[a..b];
                    assert!(
                        piece == &full[a..b] || piece.iter().all(|&x| x == 0),
                        "seed {seed}: piece {a}..{b} is torn inside a sector"
                    );
                }
                at = next;
            }
        }
        if model.reorder {
            // Somewhere a kept sector after a lost one.
            let first_zero = got.iter().position(|&b| b == 0);
            let zero_then_data = first_zero.is_some_and(|z| got[z..].iter().any(|&b| b != 0));
            seen_gap |= zero_then_data;
        } else {
            // A prefix of the writes: no zero sector before data.
            assert_eq!(&got[..], &full[..got.len()], "seed {seed}: not a prefix");
            seen_torn |= got.len() > 100 && !(got.len() - 100).is_multiple_of(1000);
        }
    }
    assert!(
        seen_torn,
        "some ordered cut tears a write at a sector boundary"
    );
    assert!(
        seen_gap,
        "some reordered cut keeps a later sector and loses an earlier one"
    );
}

#[test]
fn a_cut_point_stops_everything_and_old_handles_stay_dead() {
    let fs = SimFs::new();
    let f = fs.open(p("/f"), OpenMode::CreateNew).unwrap();
    let at = fs.ops();
    fs.cut_before(at + 1);
    f.write_all_at(b"one", 0).unwrap();
    assert!(f.sync_data().is_err(), "the cut hits the second operation");
    assert!(fs.is_down());
    assert!(f.write_all_at(b"two", 3).is_err());
    assert!(fs.open(p("/g"), OpenMode::CreateNew).is_err());
    assert_eq!(fs.cut_point().unwrap().kind, Some(OpKind::SyncData));
    let (m, mut rng) = lose_all();
    fs.restart(&m, &mut rng);
    assert!(
        f.write_all_at(b"x", 0).is_err(),
        "a handle from before the cut is dead"
    );
    assert!(!fs.exists(p("/f")), "its creation was never synced");
    assert_eq!(fs.open_handles(), 0);
}

#[test]
fn faults_fail_or_skip_chosen_operations() {
    let fs = SimFs::new();
    fs.inject(
        Fault::on(OpKind::SyncData, "/a", Effect::Fail(libc::EIO))
            .after(1)
            .times(1),
    );
    let f = fs.open(p("/a"), OpenMode::CreateNew).unwrap();
    f.sync_data().unwrap();
    let e = f.sync_data().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.sync_data().unwrap();

    // A skipped sync is a sync that never happened.
    fs.inject(Fault::on(OpKind::SyncDir, "/", Effect::Skip));
    fs.sync_dir(p("/")).unwrap();
    let (m, mut rng) = lose_all();
    fs.restart(&m, &mut rng);
    assert!(!fs.exists(p("/a")));

    // Capacity: what fits is written, then ENOSPC.
    fs.set_capacity(Some(10));
    let f = fs.open(p("/b"), OpenMode::CreateNew).unwrap();
    let e = f.write_all_at(&[1; 16], 0).unwrap_err();
    assert!(crate::is_out_of_space(&e));
    assert_eq!(f.size().unwrap(), 10);
    f.set_len(4).unwrap();
    f.write_all_at(&[2; 6], 4).unwrap();

    // Open files.
    fs.set_fd_limit(Some(fs.open_handles() + 1));
    let _g = fs.open(p("/c"), OpenMode::CreateNew).unwrap();
    let e = fs.open(p("/d"), OpenMode::CreateNew).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EMFILE));
    assert!(!fs.exists(p("/d")), "a refused open creates nothing");
    assert_eq!(fs.fd_budget().unwrap().limit, fs.open_handles());
}

#[test]
fn bit_flips_hit_synced_data_and_remove_dir_all_is_not_atomic() {
    let fs = SimFs::new();
    fs.create_dir_all(p("/t/0")).unwrap();
    let f = fs.open(p("/t/0/x"), OpenMode::CreateNew).unwrap();
    f.write_all_at(&[0; 8], 0).unwrap();
    f.sync_data().unwrap();
    for d in ["/t/0", "/t", "/"] {
        fs.sync_dir(p(d)).unwrap();
    }
    fs.flip_bit(p("/t/0/x"), 3, 2).unwrap();
    assert_eq!(content(&fs, "/t/0/x").unwrap()[3], 4);
    assert_eq!(
        fs.durable_files(p("/t")),
        vec![(PathBuf::from("/t/0/x"), 8)]
    );

    // Removing a tree is one operation per entry: cut in the middle, some entries remain.
    let before = fs.ops();
    fs.cut_before(before + 1);
    assert!(fs.remove_dir_all(p("/t")).is_err());
    fs.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(3));
    assert!(
        fs.exists(p("/t/0/x")),
        "nothing was synced: all still there"
    );
    fs.remove_dir_all(p("/t")).unwrap();
    fs.sync_dir(p("/")).unwrap();
    fs.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(3));
    assert!(!fs.exists(p("/t")));
}

#[test]
fn locks_are_exclusive_and_die_with_the_power() {
    let fs = SimFs::new();
    let l = fs.lock(p("/.lock"), true).unwrap().unwrap();
    let e = fs.lock(p("/.lock"), true).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    drop(l);
    let _l = fs.lock(p("/.lock"), true).unwrap().unwrap();
    assert!(fs.lock(p("/none"), false).unwrap().is_none());
    fs.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(0));
    // The file was never synced into its directory; the lock went with the process.
    assert!(fs.lock(p("/.lock"), true).unwrap().is_some());
}

#[test]
fn map_copies_what_is_written_and_refuses_past_the_end() {
    let fs = SimFs::new();
    let f = fs.open(p("/m"), OpenMode::CreateNew).unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    let m = f.map(5, Box::new(())).unwrap();
    assert_eq!(&m[..], b"hello");
    assert!(f.map(6, Box::new(())).is_err());
}
