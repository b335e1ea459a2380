//! The body log: message bodies over [`crate::store::INLINE_BODY_MAX`],
//! appended to segment files in `data_dir/bodies/` and never rewritten.
//!
//! sled keeps only a [`BodyRef`] (segment, offset, length, CRC-32) in the
//! message's value. A body is written once, with one `pwrite`, and read
//! with one `pread`; state changes rewrite the small record, not the body,
//! and sled's leaves stay small, so its splits and consolidations copy a
//! few hundred bytes instead of kilobytes of bodies.
//!
//! Durability goes with the store's flush ([`crate::store::Store::flush`]):
//! the segments written since the last flush are `fdatasync`ed before sled
//! flushes the records that point into them, so an acknowledged message
//! never points at a body that is not on disk. A record that sled wrote on
//! its own before a crash, for a message that was never acknowledged, may
//! point at a body that did not make it: the CRC tells, and the message
//! ends in `error` saying so.
//!
//! A segment is removed when the last message whose body it holds is
//! pruned; live counts are kept in memory and rebuilt from the records at
//! start ([`BodyLog::adopt`], [`BodyLog::sweep`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::segfile;

/// A segment is closed once it holds this much; the next body opens a new one.
pub const SEGMENT_MAX: u64 = 64 * 1024 * 1024;

/// Where a body is: its bytes are `len` bytes at `offset` of segment
/// `segment`, with CRC-32 `crc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl BodyRef {
    /// Encoded size: segment (u32), offset (u64), len (u32), crc (u32), BE.
    pub const SIZE: usize = 20;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.crc.to_be_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<BodyRef> {
        let b: &[u8; Self::SIZE] = b.try_into().ok()?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(BodyRef {
            segment: u32_at(0),
            offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
            len: u32_at(12),
            crc: u32_at(16),
        })
    }
}

struct Segment {
    file: Arc<File>,
    /// Messages whose body is in this segment.
    live: u64,
    /// Bytes it holds (reserved, for the current one): where the next body
    /// goes, and what catches a damaged reference without asking the file
    /// system.
    size: u64,
}

impl Segment {
    fn new(file: File, size: u64) -> Segment {
        Segment {
            file: Arc::new(file),
            live: 0,
            size,
        }
    }
}

struct Inner {
    segments: BTreeMap<u32, Segment>,
    /// The segment bodies are appended to.
    current: u32,
    /// Segments written since the last sync.
    dirty: BTreeMap<u32, Arc<File>>,
}

/// The open body log. Shared behind an `Arc`.
pub struct BodyLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Held across a whole [`BodyLog::sync`], so a sync that starts while
    /// another runs returns only once the marks the other took are on disk.
    syncing: Mutex<()>,
    /// Set by a failed `fdatasync`; every later sync fails with it.
    failed: segfile::SyncFailure,
}

const LOG: &str = "body log";

fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    segfile::at(LOG, path, e)
}

impl BodyLog {
    /// Opens the segments in `dir` (created if missing) and starts a new
    /// one for appends, so nothing is ever written after a torn tail.
    pub fn open(dir: &Path) -> std::io::Result<BodyLog> {
        segfile::create_dir(LOG, dir)?;
        let mut segments = BTreeMap::new();
        for n in segfile::numbers(LOG, dir)? {
            let file = segfile::open(LOG, dir, n)?;
            let size = file.metadata().map_err(|e| at(dir, e))?.len();
            segments.insert(n, Segment::new(file, size));
        }
        let current = match segments.keys().next_back() {
            None => 0,
            Some(&n) => segfile::next(LOG, dir, n)?,
        };
        let file = segfile::create(LOG, dir, current)?;
        segments.insert(current, Segment::new(file, 0));
        Ok(BodyLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                segments,
                current,
                dirty: BTreeMap::new(),
            }),
            syncing: Mutex::new(()),
            failed: segfile::SyncFailure::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every section under this lock leaves the maps whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `body` and returns where it is. It is durable after the next
    /// [`BodyLog::sync`] that starts after this returns.
    pub fn append(&self, body: &[u8]) -> std::io::Result<BodyRef> {
        let len = u32::try_from(body.len())
            .map_err(|_| std::io::Error::other("a body over 4 GiB cannot be stored"))?;
        let crc = crc32fast::hash(body);
        let (file, r) = {
            let mut inner = self.lock();
            let current = inner.current;
            let end = inner.segments.get(&current).map_or(0, |s| s.size);
            if end > 0 && end + u64::from(len) > SEGMENT_MAX {
                let next = segfile::next(LOG, &self.dir, current)?;
                let file = segfile::create(LOG, &self.dir, next)?;
                inner.segments.insert(next, Segment::new(file, 0));
                inner.current = next;
                // Every body it held may be gone already: then nothing
                // else would ever remove it.
                if inner.segments.get(&current).is_some_and(|s| s.live == 0) {
                    self.retire(&mut inner, current);
                }
            }
            let segment = inner.current;
            let seg = inner
                .segments
                .get_mut(&segment)
                .expect("the current segment is open");
            let offset = seg.size;
            seg.live += 1;
            seg.size += u64::from(len);
            let r = BodyRef {
                segment,
                offset,
                len,
                crc,
            };
            (seg.file.clone(), r)
        };
        if let Err(e) = file.write_all_at(body, r.offset) {
            self.release(&r);
            return Err(e);
        }
        // Marked only once written, so a sync that takes the mark covers
        // the bytes.
        self.lock().dirty.insert(r.segment, file);
        Ok(r)
    }

    /// Reads a body back, checking its length and CRC.
    pub fn read(&self, r: &BodyRef) -> Result<Bytes, String> {
        let (file, size) = self
            .lock()
            .segments
            .get(&r.segment)
            .map(|s| (s.file.clone(), s.size))
            .ok_or_else(|| format!("body segment {} is missing", r.segment))?;
        // A damaged reference must not make us allocate what the segment
        // does not hold.
        if r.offset.saturating_add(u64::from(r.len)) > size {
            return Err(format!(
                "body of {} bytes at {} is past the end of segment {} ({size} bytes)",
                r.len, r.offset, r.segment
            ));
        }
        let mut buf = vec![0; r.len as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(|e| {
            format!(
                "body of {} bytes at {} in segment {} cannot be read: {e}",
                r.len, r.offset, r.segment
            )
        })?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(format!(
                "body of {} bytes at {} in segment {} does not match its checksum",
                r.len, r.offset, r.segment
            ));
        }
        Ok(Bytes::from(buf))
    }

    /// Counts a body found in a stored record at start.
    pub fn adopt(&self, r: &BodyRef) {
        if let Some(s) = self.lock().segments.get_mut(&r.segment) {
            s.live += 1;
        }
    }

    /// Removes the segments no record points into (after the start-up
    /// scan has adopted every body).
    pub fn sweep(&self) -> usize {
        let mut inner = self.lock();
        let current = inner.current;
        let dead: Vec<u32> = inner
            .segments
            .iter()
            .filter(|(n, s)| s.live == 0 && **n != current)
            .map(|(n, _)| *n)
            .collect();
        for &n in &dead {
            self.retire(&mut inner, n);
        }
        dead.len()
    }

    /// Forgets segment `n`, which nothing uses, and deletes its file; a
    /// failure to delete is only logged (the next start sweeps it).
    fn retire(&self, inner: &mut Inner, n: u32) {
        inner.segments.remove(&n);
        inner.dirty.remove(&n);
        if let Err(e) = std::fs::remove_file(segfile::path(&self.dir, n)) {
            tracing::warn!(segment = n, error = %e, "body segment cannot be removed");
        }
    }

    /// The message holding `r` is gone; a closed segment with no body left
    /// in use is removed.
    pub fn release(&self, r: &BodyRef) {
        let mut inner = self.lock();
        let current = inner.current;
        let Some(s) = inner.segments.get_mut(&r.segment) else {
            return;
        };
        s.live = s.live.saturating_sub(1);
        if s.live == 0 && r.segment != current {
            self.retire(&mut inner, r.segment);
        }
    }

    /// `fdatasync`s every segment written since the last sync. Syncs take
    /// turns: one that finds the marks taken by another waits for it. After
    /// a failure every later sync fails too, as in the message log: the
    /// kernel may have dropped what it could not write, and a record must
    /// not be acknowledged pointing at a body that is not on disk.
    pub fn sync(&self) -> std::io::Result<()> {
        let _turn = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        self.failed.check()?;
        let dirty = std::mem::take(&mut self.lock().dirty);
        for (n, file) in dirty {
            if let Err(e) = file.sync_data() {
                let e = at(&segfile::path(&self.dir, n), e);
                return Err(self.failed.record(LOG, e));
            }
        }
        Ok(())
    }

    /// Segment files on disk.
    #[cfg(test)]
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_come_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let a = log.append(b"first body").unwrap();
        let b = log.append(b"second").unwrap();
        log.sync().unwrap();
        assert_eq!(&log.read(&a).unwrap()[..], b"first body");
        assert_eq!(&log.read(&b).unwrap()[..], b"second");
        assert_eq!(b.offset, a.offset + a.len as u64);
        let mut enc = Vec::new();
        b.encode(&mut enc);
        assert_eq!(BodyRef::decode(&enc), Some(b));
        assert_eq!(BodyRef::decode(&enc[1..]), None);
        let bad = BodyRef {
            crc: b.crc ^ 1,
            ..b
        };
        assert!(log.read(&bad).unwrap_err().contains("checksum"));
        let past = BodyRef {
            offset: 1 << 20,
            ..b
        };
        assert!(log.read(&past).unwrap_err().contains("past the end"));
    }

    #[test]
    fn a_reopened_log_appends_to_a_new_segment_and_sweeps_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, dropped) = {
            let log = BodyLog::open(dir.path()).unwrap();
            let kept = log.append(b"kept").unwrap();
            log.sync().unwrap();
            drop(log);
            let log = BodyLog::open(dir.path()).unwrap();
            let dropped = log.append(b"dropped").unwrap();
            log.sync().unwrap();
            (kept, dropped)
        };
        assert_ne!(kept.segment, dropped.segment);
        let log = BodyLog::open(dir.path()).unwrap();
        assert_eq!(log.segments(), 3);
        log.adopt(&kept);
        assert_eq!(log.sweep(), 1, "nothing points into the second");
        assert_eq!(&log.read(&kept).unwrap()[..], b"kept");
        assert!(log.read(&dropped).unwrap_err().contains("missing"));
        log.release(&kept);
        assert_eq!(log.segments(), 1, "only the current segment is left");
        assert!(!segfile::path(dir.path(), kept.segment).exists());
    }

    #[test]
    fn a_full_segment_is_closed_and_removed_when_its_last_body_goes() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let big = vec![7u8; (SEGMENT_MAX / 2 + 1) as usize];
        let a = log.append(&big).unwrap();
        let b = log.append(&big).unwrap();
        assert_ne!(a.segment, b.segment, "the second does not fit");
        log.sync().unwrap();
        log.release(&b);
        assert!(
            segfile::path(dir.path(), b.segment).exists(),
            "current stays"
        );
        log.release(&a);
        assert!(!segfile::path(dir.path(), a.segment).exists());
        // A segment emptied while it was current goes when it is closed.
        let c = log.append(&big).unwrap();
        assert_eq!(c.segment, b.segment + 1);
        assert!(!segfile::path(dir.path(), b.segment).exists());
        assert_eq!(log.segments(), 1);
    }
}
