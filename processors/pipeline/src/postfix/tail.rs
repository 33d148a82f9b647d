//! Following Postfix's log file: complete lines with the position after each, across
//! rotations, truncations and restarts.
//!
//! A [`Position`] is `(inode, offset)`: the file identity and the byte after the last line
//! handed out. The caller stores it **in the same transaction** as what it made of the lines
//! (the bounces tailer writes `postfix-log` records and the position together), so after a
//! crash it resumes exactly after the last line it published: nothing is emitted twice,
//! nothing skipped.
//!
//! Rotation (`mv postfix.log postfix.log.1`, then Postfix reopens `postfix.log`) is seen at the
//! end of the open file when the path names another inode: the open file is read to its end
//! once more, then the tailer switches to the new file at offset 0. At a restart, a position
//! whose inode is no longer at the path is looked for among the rotated names
//! ([`Tailer::rotated_names`]) and that file's rest is read first. Truncation in place
//! (`copytruncate`) is seen as a file shorter than the offset: reading restarts at 0.
//!
//! Bounds: a line longer than `max_line` bytes is cut there (the rest of it skipped, counted
//! in [`Tailer::oversized`]); one poll returns at most `max_lines` lines. An incomplete last
//! line (no newline yet) is left for the next poll.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the tailer is: the file's inode and the offset after the last line handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Inode of the file.
    pub inode: u64,
    /// Byte offset after the last complete line returned.
    pub offset: u64,
}

/// A line and the position right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The text, without the newline (invalid UTF-8 replaced).
    pub text: String,
    /// Where to resume after this line.
    pub after: Position,
}

/// Follows one log path.
#[derive(Debug)]
pub struct Tailer {
    path: PathBuf,
    file: Option<File>,
    pos: Position,
    /// Bytes read past `pos.offset` that do not yet end in a newline.
    pending: Vec<u8>,
    /// Still skipping the rest of an oversized line.
    skipping: bool,
    max_line: usize,
    /// Lines cut at `max_line`.
    pub oversized: u64,
    /// Rotations followed.
    pub rotations: u64,
}

impl Tailer {
    /// Default bound on a line (Postfix's lines are well under 2 KiB).
    pub const MAX_LINE: usize = 16 * 1024;

    /// Names a rotated file may have, tried at a restart (`path.1`, `path.0`, `path.old`).
    pub fn rotated_names(path: &Path) -> Vec<PathBuf> {
        [".1", ".0", ".old"]
            .iter()
            .map(|s| {
                let mut p = path.as_os_str().to_owned();
                p.push(s);
                PathBuf::from(p)
            })
            .collect()
    }

    /// Starts following `path` from `resume` (a stored position) or from its beginning. A
    /// missing file is fine: it is opened when it appears.
    pub fn open(path: impl Into<PathBuf>, resume: Option<Position>) -> io::Result<Tailer> {
        let path = path.into();
        let mut t = Tailer {
            path,
            file: None,
            pos: Position::default(),
            pending: Vec::new(),
            skipping: false,
            max_line: Self::MAX_LINE,
            oversized: 0,
            rotations: 0,
        };
        if let Some(p) = resume {
            let candidates = std::iter::once(t.path.clone()).chain(Self::rotated_names(&t.path));
            for c in candidates {
                if let Ok(f) = File::open(&c)
                    && f.metadata()?.ino() == p.inode
                {
                    t.attach(f, p.offset)?;
                    return Ok(t);
                }
            }
            tracing::warn!(path = %t.path.display(), inode = p.inode, offset = p.offset,
                "the stored log position's file is gone; reading the current file from its start");
        }
        t.reopen()?;
        Ok(t)
    }

    /// Sets the bound on one line.
    pub fn with_max_line(mut self, max_line: usize) -> Self {
        self.max_line = max_line.max(64);
        self
    }

    /// The position after the last line returned.
    pub fn position(&self) -> Position {
        self.pos
    }

    fn attach(&mut self, mut f: File, offset: u64) -> io::Result<()> {
        let meta = f.metadata()?;
        let offset = if meta.len() < offset { 0 } else { offset };
        f.seek(SeekFrom::Start(offset))?;
        self.pos = Position {
            inode: meta.ino(),
            offset,
        };
        self.file = Some(f);
        self.pending.clear();
        self.skipping = false;
        Ok(())
    }

    fn reopen(&mut self) -> io::Result<()> {
        match File::open(&self.path) {
            Ok(f) => self.attach(f, 0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.file = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Up to `max_lines` complete lines available now (empty when there is nothing new).
    pub fn poll(&mut self, max_lines: usize) -> io::Result<Vec<Line>> {
        let mut out = Vec::new();
        if self.file.is_none() {
            self.reopen()?;
        }
        loop {
            let got = self.read_lines(max_lines - out.len(), &mut out)?;
            if out.len() >= max_lines {
                return Ok(out);
            }
            if got {
                continue;
            }
            // At the end of the open file: rotated or truncated?
            let Some(f) = &self.file else { return Ok(out) };
            let open_meta = f.metadata()?;
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != self.pos.inode => {
                    // Rotated: the open file was read to its end just now; switch.
                    self.rotations += 1;
                    self.reopen()?;
                    continue;
                }
                Ok(_) if open_meta.len() < self.pos.offset + self.pending.len() as u64 => {
                    tracing::warn!(path = %self.path.display(), "log truncated in place; reading from 0");
                    self.reopen()?;
                    continue;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Reads what is there; returns whether any byte was read.
    fn read_lines(&mut self, max_lines: usize, out: &mut Vec<Line>) -> io::Result<bool> {
        let Some(f) = self.file.as_mut() else {
            return Ok(false);
        };
        let mut buf = [0u8; 64 * 1024];
        let mut any = false;
        while out.len() < max_lines {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            any = true;
            let mut chunk = &buf[..n];
            while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                let consumed = self.pending.len() + nl + 1;
                if !self.skipping {
                    let room = self.max_line.saturating_sub(self.pending.len());
                    if nl > room {
                        self.oversized += 1;
                    }
                    self.pending.extend_from_slice(&chunk[..nl.min(room)]);
                }
                self.skipping = false;
                self.pos.offset += consumed as u64;
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out.push(Line {
                    text,
                    after: self.pos,
                });
                chunk = &chunk[nl + 1..];
                if out.len() >= max_lines {
                    // Give back what we read past this line.
                    let back = chunk.len() as i64;
                    f.seek(SeekFrom::Current(-back))?;
                    return Ok(true);
                }
            }
            if self.skipping {
                // Count skipped bytes as pending so the offset stays right.
                self.pos.offset += chunk.len() as u64;
            } else {
                let room = self.max_line.saturating_sub(self.pending.len());
                if chunk.len() > room {
                    self.pending.extend_from_slice(&chunk[..room]);
                    self.skipping = true;
                    self.oversized += 1;
                    // The cut line is handed out when its newline arrives; the bytes skipped
                    // meanwhile advance the offset.
                    self.pos.offset += (chunk.len() - room) as u64;
                } else {
                    self.pending.extend_from_slice(chunk);
                }
            }
        }
        Ok(any)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, s: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn partial_lines_wait_and_positions_resume() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("postfix.log");
        let mut t = Tailer::open(&p, None).unwrap();
        assert!(t.poll(10).unwrap().is_empty(), "missing file: nothing yet");
        append(&p, "one\ntw");
        let got = t.poll(10).unwrap();
        assert_eq!(texts(&got), vec!["one"]);
        append(&p, "o\nthree\n");
        let got = t.poll(1).unwrap();
        assert_eq!(texts(&got), vec!["two"]);
        let resume = got[0].after;
        assert_eq!(resume.offset, 8);
        // A restart from the stored position continues after "two".
        let mut t2 = Tailer::open(&p, Some(resume)).unwrap();
        assert_eq!(texts(&t2.poll(10).unwrap()), vec!["three"]);
        assert_eq!(texts(&t.poll(10).unwrap()), vec!["three"]);
    }

    #[test]
    fn follows_rotation_live_and_across_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("postfix.log");
        append(&p, "a\nb\n");
        let mut t = Tailer::open(&p, None).unwrap();
        assert_eq!(texts(&t.poll(1).unwrap()), vec!["a"]);
        let stored = t.position();
        // Rotate with a line written to the old file after our last read, then new lines.
        append(&p, "c\n");
        std::fs::rename(&p, Tailer::rotated_names(&p)[0].clone()).unwrap();
        append(&p, "d\n");
        assert_eq!(texts(&t.poll(100).unwrap()), vec!["b", "c", "d"]);
        assert_eq!(t.rotations, 1);
        // A process that stopped at "a" resumes in the rotated file, then the new one.
        let mut r = Tailer::open(&p, Some(stored)).unwrap();
        assert_eq!(texts(&r.poll(100).unwrap()), vec!["b", "c", "d"]);
    }

    #[test]
    fn truncation_and_oversized_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("postfix.log");
        append(&p, "first line\n");
        let mut t = Tailer::open(&p, None).unwrap().with_max_line(64);
        assert_eq!(t.poll(10).unwrap().len(), 1);
        std::fs::write(&p, "x\n").unwrap(); // truncated in place and rewritten shorter
        assert_eq!(texts(&t.poll(10).unwrap()), vec!["x"]);
        let long = "y".repeat(200);
        append(&p, &format!("{long}\nafter\n"));
        let got = t.poll(10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].text.len(), 64);
        assert_eq!(got[1].text, "after");
        assert_eq!(got[1].after.offset, std::fs::metadata(&p).unwrap().len());
        assert_eq!(t.oversized, 1);
    }
}
