//! The message log: every version of every message record, appended to
//! segment files in `data_dir/messages/`, with an index in memory.
//!
//! A record is written on enqueue and again at each change of state, and
//! each write is an append: the entry goes into a buffer under a short
//! lock, and the buffer reaches the file in one `pwrite` when it is large
//! or when the log is synced. Compared with sled's B-tree this is a copy
//! instead of a tree insert and page rewrites, which is most of what an
//! enqueue and a delivery cost besides HTTP.
//!
//! **Entry:** CRC-32 (u32 BE, over the rest of the entry), seq (u64 BE),
//! length (u32 BE), then the value; a length of [`TOMBSTONE`] with no value
//! removes the seq. The index maps each seq to its latest entry; opening
//! the log reads every segment in order to rebuild it, the later entry of a
//! seq winning.
//!
//! **Shared tails:** a length with the [`SHARED`] bit set marks an entry
//! whose value ends with the last bytes of an earlier, whole entry of the
//! same seq (its *base*): the value written is the base's segment, offset
//! and value length and the tail's length (u32 BE each), then the head.
//! Read, it is the head followed by the base's tail, so readers never see
//! the difference. A message's record changes at each attempt while its
//! body does not: the queue writes the new record with the body shared
//! ([`MessageLog::insert_sharing_tail`]), so a delivery appends a couple of
//! hundred bytes instead of the body again. The base stays live, and its
//! segment with it, for as long as an entry that shares it is the latest;
//! compaction writes the seq whole again.
//!
//! **Durability:** [`MessageLog::sync`] writes the buffer and `fdatasync`s
//! what was written since the last sync; the store's flush calls it, so a
//! record is on disk before its enqueue is acknowledged. A thread syncs
//! what the deliveries wrote at least every [`SYNC_EVERY`], as sled does for
//! its own writes. A segment is synced before the next one is started, so
//! only the last segment can end in a torn entry (a crash mid-write, of
//! something never acknowledged); opening the log cuts it off there, and
//! keeps the bytes it cut in a file beside it, named after the segment and
//! the offset, should they be damage instead. A bad entry anywhere else is
//! damage, and the log refuses to open, naming the segment and the offset.
//! After a failed `fdatasync` the kernel may have dropped what it could not
//! write, so every later sync fails (and no enqueue is acknowledged) until
//! a restart reads back what is on disk.
//!
//! **Space:** segments are retired oldest first, once synced and once
//! nothing in them is the latest version of a record. Retiring strictly in
//! order means a tombstone never outlives a segment holding an older
//! version of its seq, so nothing removed comes back. The oldest segment is
//! compacted ([`MessageLog::compact`]) when less than a quarter of it is
//! still live, or when the segments right behind it that hold nothing live
//! are at least as large as what it holds live: its live entries are
//! appended again, synced, and it goes, with them.
//! Messages are pruned in creation order, so segments empty from the
//! oldest on; compaction moves the few that stay behind (a paused
//! integration's messages).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::segfile;

/// A segment is closed once it holds this much.
pub const SEGMENT_MAX: u64 = 32 * 1024 * 1024;

/// The largest value the log takes; records are far smaller (bodies over
/// 4 KiB go to the body log).
pub const VALUE_MAX: u32 = 16 * 1024 * 1024;

/// The length that marks a removal.
const TOMBSTONE: u32 = u32::MAX;

/// The length bit of an entry that shares its tail with its base.
const SHARED: u32 = 1 << 31;

/// The reference at the start of a shared entry's value: the base's
/// segment, offset and value length, and the tail's length.
const REFERENCE: usize = 16;

/// CRC, seq, length.
const HEADER: usize = 16;

/// The buffer is written out once it holds this much.
const WRITE_AT: usize = 1024 * 1024;

/// The longest a delivery's record waits in memory before it is synced.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

/// How close to its end the current segment is synced ahead of time.
/// Closing a segment syncs it under the log's lock, and every append and
/// read waits meanwhile; synced ahead on the log's thread, that sync only
/// has the last few megabytes left to write. (Deliveries write 50 MB/s and
/// more, which the log's thread syncs every half second: a close without
/// this synced up to 28 MB, measured at 10–14 ms, with the lock held.)
const SYNC_AHEAD: u64 = 4 * 1024 * 1024;

/// Where the latest entry of a seq is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u32,
    /// Of the entry's header. A segment ends before [`SEGMENT_MAX`] plus
    /// one entry, so a `u32` holds it.
    offset: u32,
    /// Of the value as written (for a shared entry: the reference and the
    /// head).
    len: u32,
    /// For a shared entry, the whole entry whose tail it shares.
    base: Option<Base>,
}

// The index holds one per retained message (ARCHITECTURE.md gives it).
const _: () = assert!(std::mem::size_of::<Loc>() == 32);

/// The whole entry a shared one takes its tail from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Base {
    segment: u32,
    offset: u32,
    len: u32,
    /// How many of its last bytes the shared entry takes.
    tail: u32,
}

/// Which write of a seq a read saw: two reads saw the same write when their
/// versions are equal, and [`MessageLog::version`] tells without reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(Loc);

impl Loc {
    fn entry_len(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }

    /// The length field of its entry.
    fn field(&self) -> u32 {
        match self.base {
            Some(_) => self.len | SHARED,
            None => self.len,
        }
    }

    /// The base a new entry takes `tail` bytes from, if the value here
    /// ends with them: this entry when whole, else its own base when the
    /// tail is within the one it shares.
    fn base_for(&self, tail: u32) -> Option<Base> {
        match self.base {
            None => (tail <= self.len).then_some(Base {
                segment: self.segment,
                offset: self.offset,
                len: self.len,
                tail,
            }),
            Some(b) => (tail <= b.tail).then_some(Base { tail, ..b }),
        }
    }
}

/// Adds to (or takes from) the live bytes of the segments what `loc`
/// keeps live: its entry, and the base it shares a tail with.
fn count(segments: &mut BTreeMap<u32, Segment>, loc: &Loc, add: bool) {
    let base = loc
        .base
        .map(|b| (b.segment, HEADER as u64 + u64::from(b.len)));
    for (n, len) in std::iter::once((loc.segment, loc.entry_len())).chain(base) {
        if let Some(s) = segments.get_mut(&n) {
            s.live = match add {
                true => s.live + len,
                false => s.live.saturating_sub(len),
            };
        }
    }
}

/// The length field of an entry holding `value`, if the log takes it.
fn value_len(value: &[u8]) -> std::io::Result<u32> {
    u32::try_from(value.len())
        .ok()
        .filter(|&l| l <= VALUE_MAX)
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "a message record of {} bytes is over the {VALUE_MAX}-byte limit",
                value.len()
            ))
        })
}

/// The reference and the head of a shared entry's value.
fn shared_value(base: &Base, head: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(REFERENCE + head.len());
    for n in [base.segment, base.offset, base.len, base.tail] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v.extend_from_slice(head);
    v
}

/// The base named at the start of a shared entry's value.
fn reference(value: &[u8]) -> Option<Base> {
    let word = |i: usize| {
        value
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let base = Base {
        segment: word(0)?,
        offset: word(1)?,
        len: word(2)?,
        tail: word(3)?,
    };
    (base.tail <= base.len && base.len <= VALUE_MAX).then_some(base)
}

struct Segment {
    file: Arc<File>,
    /// Bytes it holds, counting the buffer (for the current one).
    size: u64,
    /// Bytes of the entries that are the latest of their seq.
    live: u64,
}

impl Segment {
    fn new(file: File) -> Segment {
        Segment {
            file: Arc::new(file),
            size: 0,
            live: 0,
        }
    }
}

struct Inner {
    index: BTreeMap<u64, Loc>,
    segments: BTreeMap<u32, Segment>,
    current: u32,
    /// Bytes of the current segment from `written` on, not yet in the file.
    buf: Vec<u8>,
    written: u64,
    /// Written to its file since the last sync.
    dirty: bool,
}

/// Where a value is read from (see [`MessageLog::source`]).
enum Source {
    Copied(Bytes),
    File(Arc<File>),
}

/// The open message log. Shared behind an `Arc`.
pub struct MessageLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Held across a whole sync, so one that starts while another runs
    /// returns only once what it wrote is on disk.
    syncing: Mutex<()>,
    /// Set by a failed `fdatasync`; every later sync fails with it.
    failed: segfile::SyncFailure,
    /// The last segment that could not be removed (logged once).
    retire_failed: AtomicU32,
    /// The log's syncing thread, woken to sync a segment near its end.
    syncer: std::sync::OnceLock<std::thread::Thread>,
    /// The data dir's lock, held until the last sync of a drop is done.
    _lock: Option<Arc<File>>,
}

const LOG: &str = "message log";

fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    segfile::at(LOG, path, e)
}

fn damaged(path: &Path, offset: u64, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "message log {} is damaged at offset {offset}: {what}",
            path.display()
        ),
    )
}

fn entry_crc(seq: u64, len: u32, value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_be_bytes());
    h.update(&len.to_be_bytes());
    h.update(value);
    h.finalize()
}

fn push_entry(buf: &mut Vec<u8>, crc: u32, seq: u64, len: u32, value: &[u8]) {
    buf.extend_from_slice(&crc.to_be_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(value);
}

/// How reading a segment ended.
enum Scanned {
    /// At its end.
    Whole,
    /// At a bad or cut-off entry at `offset`, for `reason`.
    Bad { offset: u64, reason: String },
}

/// Reads segment `n`'s entries in order into the index.
fn scan(
    path: &Path,
    n: u32,
    file: &File,
    index: &mut BTreeMap<u64, Loc>,
    segments: &mut BTreeMap<u32, Segment>,
) -> std::io::Result<(u64, Scanned)> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut value = Vec::new();
    loop {
        let mut header = [0u8; HEADER];
        match read_full(&mut reader, &mut header).map_err(|e| at(path, e))? {
            0 => return Ok((offset, Scanned::Whole)),
            HEADER => {}
            got => {
                let reason = format!("an entry cut off after {got} of its {HEADER}-byte header");
                return Ok((offset, Scanned::Bad { offset, reason }));
            }
        }
        let crc = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
        let seq = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let Ok(offset32) = u32::try_from(offset) else {
            let reason = "an entry past 4 GiB, beyond any segment this log writes".to_string();
            return Ok((offset, Scanned::Bad { offset, reason }));
        };
        let value_len = match len {
            TOMBSTONE => 0,
            _ => len & !SHARED,
        };
        if value_len > VALUE_MAX {
            let reason = format!("an entry of {len} bytes, over the {VALUE_MAX}-byte limit");
            return Ok((offset, Scanned::Bad { offset, reason }));
        }
        value.resize(value_len as usize, 0);
        let got = read_full(&mut reader, &mut value).map_err(|e| at(path, e))?;
        if got < value.len() {
            let reason = format!("an entry cut off after {got} of its {value_len} bytes");
            return Ok((offset, Scanned::Bad { offset, reason }));
        }
        if entry_crc(seq, len, &value) != crc {
            let reason = "an entry that does not match its checksum".to_string();
            return Ok((offset, Scanned::Bad { offset, reason }));
        }
        let base = match len {
            TOMBSTONE => None,
            _ if len & SHARED == 0 => None,
            _ => match reference(&value) {
                Some(b) => Some(b),
                None => {
                    let reason = "a shared entry whose reference makes no sense".to_string();
                    return Ok((offset, Scanned::Bad { offset, reason }));
                }
            },
        };
        let old = if len == TOMBSTONE {
            index.remove(&seq)
        } else {
            let loc = Loc {
                segment: n,
                offset: offset32,
                len: value_len,
                base,
            };
            count(segments, &loc, true);
            index.insert(seq, loc)
        };
        if let Some(old) = old {
            count(segments, &old, false);
        }
        offset += HEADER as u64 + u64::from(value_len);
    }
}

/// Cuts the last segment `n` (`file`) at `offset`, where its entries stop
/// making sense. After a crash that tail is what was being written, never
/// acknowledged; its bytes are kept aside first, in a file named after the
/// segment and the offset, in case it is damage instead.
fn cut_tail(dir: &Path, n: u32, file: &File, offset: u64, reason: &str) -> std::io::Result<()> {
    let path = segfile::path(dir, n);
    let size = file.metadata().map_err(|e| at(&path, e))?.len();
    let kept = dir.join(format!("{n:010}.log.cut-at-{offset}"));
    File::create(&kept)
        .and_then(|mut f| {
            let mut from = file;
            std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(offset))?;
            std::io::copy(&mut from.take(size - offset), &mut f)?;
            f.sync_all()
        })
        .map_err(|e| at(&kept, e))?;
    segfile::sync_dir(LOG, dir)?;
    tracing::warn!(
        segment = %path.display(),
        offset,
        cut = size - offset,
        kept = %kept.display(),
        reason,
        "cut a torn entry off the end of the message log: after a crash these are writes never acknowledged; the bytes are kept aside"
    );
    file.set_len(offset).map_err(|e| at(&path, e))?;
    file.sync_data().map_err(|e| at(&path, e))
}

/// Reads until `buf` is full or the reader ends; returns how much it read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl MessageLog {
    /// Opens the segments in `dir` (created if missing), rebuilds the
    /// index, cuts a torn entry off the end of the last segment, and starts
    /// the thread that syncs what deliveries write.
    /// `lock` is the data dir's lock: the log holds it until its last sync
    /// (on drop, maybe on its own thread) is done.
    pub fn open(dir: &Path, lock: Option<Arc<File>>) -> std::io::Result<Arc<MessageLog>> {
        segfile::create_dir(LOG, dir)?;
        let numbers = segfile::numbers(LOG, dir)?;
        let mut index = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let last = numbers.last().copied();
        for &n in &numbers {
            let path = segfile::path(dir, n);
            segments.insert(n, Segment::new(segfile::open(LOG, dir, n)?));
            let file = segments[&n].file.clone();
            let (end, how) = scan(&path, n, &file, &mut index, &mut segments)?;
            match how {
                Scanned::Whole => {}
                Scanned::Bad { offset, reason } if Some(n) != last => {
                    return Err(damaged(&path, offset, reason));
                }
                Scanned::Bad { offset, reason } => cut_tail(dir, n, &file, offset, &reason)?,
            }
            segments.get_mut(&n).expect("inserted above").size = end;
        }
        // A shared entry's base is live, so its segment was never retired.
        if let Some((seq, b)) = index.iter().find_map(|(seq, l)| {
            l.base
                .filter(|b| !segments.contains_key(&b.segment))
                .map(|b| (seq, b))
        }) {
            return Err(damaged(
                &segfile::path(dir, b.segment),
                u64::from(b.offset),
                format!("message {seq:016x} shares its body with an entry there, and the segment is missing"),
            ));
        }
        let current = match last {
            Some(n) => n,
            None => {
                segments.insert(1, Segment::new(segfile::create(LOG, dir, 1)?));
                1
            }
        };
        let written = segments[&current].size;
        let log = Arc::new(MessageLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                index,
                segments,
                current,
                buf: Vec::with_capacity(WRITE_AT + (64 << 10)),
                written,
                // What a killed daemon wrote may still be only in the page
                // cache: the first sync makes it durable before anything
                // it superseded is retired.
                dirty: true,
            }),
            syncing: Mutex::new(()),
            failed: segfile::SyncFailure::default(),
            retire_failed: AtomicU32::new(0),
            syncer: std::sync::OnceLock::new(),
            _lock: lock,
        });
        let weak = Arc::downgrade(&log);
        let thread = std::thread::Builder::new()
            .name("outbox-msglog".into())
            .spawn(move || syncer(weak))
            .map_err(|e| at(dir, e))?;
        let _ = log.syncer.set(thread.thread().clone());
        Ok(log)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every section under this lock leaves the maps whole or returns an
        // error before changing them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest value of `seq`.
    pub fn get(&self, seq: u64) -> std::io::Result<Option<Bytes>> {
        Ok(self.get_versioned(seq)?.map(|(_, v)| v))
    }

    /// The version of `seq`'s latest value, from memory.
    pub fn version(&self, seq: u64) -> Option<Version> {
        self.lock().index.get(&seq).copied().map(Version)
    }

    /// The latest value of `seq`, with its version.
    pub fn get_versioned(&self, seq: u64) -> std::io::Result<Option<(Version, Bytes)>> {
        self.get_part(seq, true)
    }

    /// The latest value of `seq`, or with `whole` false its head alone
    /// when its entry shares a tail.
    fn get_part(&self, seq: u64, whole: bool) -> std::io::Result<Option<(Version, Bytes)>> {
        // The entry and its base are found in one look at the index, and
        // read outside the lock: a segment retired meanwhile is still open
        // here, and the checksum tells a read of anything else.
        let (loc, entry, base) = {
            let inner = self.lock();
            let Some(&loc) = inner.index.get(&seq) else {
                return Ok(None);
            };
            let entry = self.source(&inner, seq, loc.segment, loc.offset, loc.len)?;
            let base = match loc.base {
                Some(b) if whole => {
                    Some((b, self.source(&inner, seq, b.segment, b.offset, b.len)?))
                }
                _ => None,
            };
            (loc, entry, base)
        };
        let value = self.fetch(seq, loc.segment, loc.offset, loc.field(), entry)?;
        if loc.base.is_none() {
            return Ok(Some((Version(loc), value)));
        }
        let head = value.slice(REFERENCE..);
        let Some((b, source)) = base else {
            return Ok(Some((Version(loc), head)));
        };
        let whole = self.fetch(seq, b.segment, b.offset, b.len, source)?;
        let mut v = Vec::with_capacity(head.len() + b.tail as usize);
        v.extend_from_slice(&head);
        v.extend_from_slice(&whole[(b.len - b.tail) as usize..]);
        Ok(Some((Version(loc), Bytes::from(v))))
    }

    /// Where the value of the entry of `seq` at `offset` in `segment`, `len`
    /// bytes long, is read from: copied from the buffer now, or the
    /// segment's file to read it from.
    fn source(
        &self,
        inner: &Inner,
        seq: u64,
        segment: u32,
        offset: u32,
        len: u32,
    ) -> std::io::Result<Source> {
        let offset = u64::from(offset);
        if segment == inner.current && offset >= inner.written {
            let start = (offset - inner.written) as usize + HEADER;
            let value = &inner.buf[start..start + len as usize];
            return Ok(Source::Copied(Bytes::copy_from_slice(value)));
        }
        match inner.segments.get(&segment) {
            Some(s) => Ok(Source::File(s.file.clone())),
            None => Err(damaged(
                &segfile::path(&self.dir, segment),
                offset,
                format!("the entry of message {seq:016x} is in a segment that is gone"),
            )),
        }
    }

    /// The value of the entry of `seq` at `offset` in `segment`, whose
    /// length field is `field`, from `source`; read from a file, it is
    /// checked against its checksum.
    fn fetch(
        &self,
        seq: u64,
        segment: u32,
        offset: u32,
        field: u32,
        source: Source,
    ) -> std::io::Result<Bytes> {
        let file = match source {
            Source::Copied(value) => return Ok(value),
            Source::File(file) => file,
        };
        let offset = u64::from(offset);
        let mut entry = vec![0; HEADER + (field & !SHARED) as usize];
        let path = || segfile::path(&self.dir, segment);
        file.read_exact_at(&mut entry, offset)
            .map_err(|e| at(&path(), e))?;
        let crc = u32::from_be_bytes(entry[0..4].try_into().expect("4 bytes"));
        let found = u64::from_be_bytes(entry[4..12].try_into().expect("8 bytes"));
        if found != seq || entry_crc(seq, field, &entry[HEADER..]) != crc {
            return Err(damaged(
                &path(),
                offset,
                format!("the entry of message {seq:016x} does not match its checksum"),
            ));
        }
        Ok(Bytes::from(entry).slice(HEADER..))
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.lock().index.contains_key(&seq)
    }

    /// Writes `value` as the latest of `seq`. It is durable after the next
    /// [`MessageLog::sync`] that starts after this returns.
    pub fn insert(&self, seq: u64, value: &[u8]) -> std::io::Result<()> {
        let len = value_len(value)?;
        let crc = entry_crc(seq, len, value);
        let mut inner = self.lock();
        self.append(&mut inner, crc, seq, len, value, None)
    }

    /// Writes `head` followed by the last `tail` bytes of `seq`'s current
    /// value as its latest value, without writing those bytes again: the
    /// entry refers to the whole entry that holds them. False, and nothing
    /// written, when `seq` has no value or its value does not end with
    /// `tail` bytes of a whole entry; the caller then writes it whole.
    pub fn insert_sharing_tail(&self, seq: u64, head: &[u8], tail: usize) -> std::io::Result<bool> {
        let Ok(tail) = u32::try_from(tail) else {
            return Ok(false);
        };
        let mut inner = self.lock();
        let Some(base) = inner.index.get(&seq).and_then(|l| l.base_for(tail)) else {
            return Ok(false);
        };
        let value = shared_value(&base, head);
        let field = value_len(&value)? | SHARED;
        let crc = entry_crc(seq, field, &value);
        self.append(&mut inner, crc, seq, field, &value, Some(base))?;
        Ok(true)
    }

    /// Removes `seq`; true if it was there.
    pub fn remove(&self, seq: u64) -> std::io::Result<bool> {
        let crc = entry_crc(seq, TOMBSTONE, &[]);
        let mut inner = self.lock();
        if !inner.index.contains_key(&seq) {
            return Ok(false);
        }
        self.append(&mut inner, crc, seq, TOMBSTONE, &[], None)?;
        Ok(true)
    }

    /// Appends an entry whose length field is `len` (with [`SHARED`] set
    /// for an entry sharing the tail of `base`) and makes it the latest of
    /// `seq`.
    fn append(
        &self,
        inner: &mut Inner,
        crc: u32,
        seq: u64,
        len: u32,
        value: &[u8],
        base: Option<Base>,
    ) -> std::io::Result<()> {
        let entry_len = (HEADER + value.len()) as u64;
        let size = inner.segments[&inner.current].size;
        if size > 0 && size + entry_len > SEGMENT_MAX {
            self.roll(inner)?;
        }
        let current = inner.current;
        let seg = inner.segments.get_mut(&current).expect("current is open");
        let offset = seg.size;
        seg.size += entry_len;
        push_entry(&mut inner.buf, crc, seq, len, value);
        // This entry crossed the mark: the log's thread syncs ahead.
        let mark = SEGMENT_MAX - SYNC_AHEAD;
        if offset < mark && seg.size >= mark {
            if let Some(t) = self.syncer.get() {
                t.unpark();
            }
        }
        let old = if len == TOMBSTONE {
            inner.index.remove(&seq)
        } else {
            let loc = Loc {
                segment: current,
                offset: offset as u32,
                len: len & !SHARED,
                base,
            };
            count(&mut inner.segments, &loc, true);
            inner.index.insert(seq, loc)
        };
        if let Some(old) = old {
            count(&mut inner.segments, &old, false);
        }
        // The entry is in the index now, so it must not be reported as not
        // written: a failed write leaves the buffer for the next sync,
        // which reports the error to whoever waits for durability.
        if inner.buf.len() >= WRITE_AT {
            if let Err(e) = self.write_out(inner) {
                tracing::warn!(error = %e, "message log write failed; kept in memory for the next sync");
            }
        }
        Ok(())
    }

    /// Writes the buffer to the current segment. On a failure the buffer
    /// stays, to be written again at the same place.
    fn write_out(&self, inner: &mut Inner) -> std::io::Result<()> {
        if inner.buf.is_empty() {
            return Ok(());
        }
        let file = inner.segments[&inner.current].file.clone();
        file.write_all_at(&inner.buf, inner.written)
            .map_err(|e| at(&segfile::path(&self.dir, inner.current), e))?;
        inner.written += inner.buf.len() as u64;
        inner.buf.clear();
        inner.dirty = true;
        Ok(())
    }

    /// Closes the current segment, synced, and starts the next one.
    fn roll(&self, inner: &mut Inner) -> std::io::Result<()> {
        self.failed.check()?;
        self.write_out(inner)?;
        let old = inner.current;
        if let Err(e) = inner.segments[&old].file.sync_data() {
            return Err(self
                .failed
                .record(LOG, at(&segfile::path(&self.dir, old), e)));
        }
        let next = segfile::next(LOG, &self.dir, old)?;
        let file = segfile::create(LOG, &self.dir, next)?;
        inner.segments.insert(next, Segment::new(file));
        inner.current = next;
        inner.written = 0;
        inner.dirty = false;
        Ok(())
    }

    /// Writes the buffer and `fdatasync`s the current segment, then
    /// retires the oldest segments that held nothing live when the buffer
    /// was written: what superseded their entries is on disk now (closed
    /// segments are synced when they are closed). One that empties later
    /// waits for the next sync, whose write covers what emptied it.
    pub fn sync(&self) -> std::io::Result<()> {
        let _turn = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        self.failed.check()?;
        let (file, n, dead) = {
            let mut inner = self.lock();
            self.write_out(&mut inner)?;
            let file = std::mem::take(&mut inner.dirty)
                .then(|| inner.segments[&inner.current].file.clone());
            (file, inner.current, dead_segments(&inner))
        };
        if let Some(file) = file {
            if let Err(e) = file.sync_data() {
                return Err(self.failed.record(LOG, at(&segfile::path(&self.dir, n), e)));
            }
        }
        self.retire(&dead)
    }

    /// Whether anything waits to be synced.
    fn pending(&self) -> bool {
        let inner = self.lock();
        inner.dirty || !inner.buf.is_empty()
    }

    /// Deletes segments `dead` (from [`dead_segments`]). A closed segment
    /// never gains a live entry, so they are still dead.
    fn retire(&self, dead: &[u32]) -> std::io::Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        // In order, and forgotten only once deleted: a segment left behind
        // must keep every later one (and its tombstones) too. A failure
        // costs disk space, not data, so it is logged (once per segment)
        // and the next sync tries again.
        {
            let mut inner = self.lock();
            for n in dead {
                let path = segfile::path(&self.dir, *n);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        if self.retire_failed.swap(*n, Ordering::Relaxed) != *n {
                            tracing::warn!(segment = %path.display(), error = %e, "message log segment cannot be removed; trying again at each sync");
                        }
                        break;
                    }
                }
                inner.segments.remove(n);
            }
        }
        segfile::sync_dir(LOG, &self.dir)
    }

    /// Moves the live entries out of the oldest closed segment, then
    /// retires it, when less than a quarter of it is live, or when the
    /// closed segments right behind it that hold nothing live (which go
    /// with it) are at least as large as what it holds live. Only segments
    /// numbered below `before` are compacted, so a caller that passes
    /// [`MessageLog::current`] from before its first call ends: what it
    /// moves lands at or after that number. Returns how many entries moved.
    pub fn compact(&self, before: u32) -> std::io::Result<usize> {
        let seqs = {
            let inner = self.lock();
            let Some((&n, s)) = inner.segments.iter().next() else {
                return Ok(0);
            };
            // Only the closed segments with nothing live right behind it
            // go when it goes.
            let freed_after: u64 = inner
                .segments
                .iter()
                .skip(1)
                .take_while(|(&m, t)| m != inner.current && t.live == 0)
                .map(|(_, t)| t.size)
                .sum();
            if n >= before
                || n == inner.current
                || s.live == 0
                || (s.live * 4 > s.size && s.live > freed_after)
            {
                return Ok(0);
            }
            // The seqs whose latest entry, or the base it shares a tail
            // with, is there: they are written again whole.
            inner
                .index
                .iter()
                .filter(|(_, l)| l.segment == n || l.base.is_some_and(|b| b.segment == n))
                .map(|(&seq, _)| seq)
                .collect::<Vec<u64>>()
        };
        let mut moved = 0;
        for seq in seqs {
            let Some((version, value)) = self.get_versioned(seq)? else {
                continue;
            };
            let crc = entry_crc(seq, value.len() as u32, &value);
            let mut inner = self.lock();
            // Only if what was read is still the latest: a write meanwhile
            // already moved it on.
            if inner
                .index
                .get(&seq)
                .is_some_and(|l| Version(*l) == version)
            {
                self.append(&mut inner, crc, seq, value.len() as u32, &value, None)?;
                moved += 1;
            }
        }
        self.sync()?;
        Ok(moved)
    }

    /// The seqs in `range`, ascending, at most `limit` of them.
    fn seqs(&self, range: impl RangeBounds<u64>, limit: usize, rev: bool) -> Vec<u64> {
        let inner = self.lock();
        let r = inner.index.range(range).map(|(&s, _)| s);
        if rev {
            r.rev().take(limit).collect()
        } else {
            r.take(limit).collect()
        }
    }

    /// The values from `from` on, in seq order (or from `from` down, with
    /// `rev`). Read a chunk at a time: a value written meanwhile may or
    /// may not be seen, as with a sled iterator.
    pub fn iter(self: &Arc<Self>, from: u64, rev: bool) -> Iter {
        Iter {
            log: self.clone(),
            next: Some(from),
            rev,
            whole: true,
            chunk: Vec::new().into_iter(),
        }
    }

    /// As [`MessageLog::iter`], but a value whose entry shares a tail
    /// comes without it: one read each, for scans that want the records
    /// and not the bodies they end with.
    pub fn heads(self: &Arc<Self>, from: u64, rev: bool) -> Iter {
        Iter {
            whole: false,
            ..self.iter(from, rev)
        }
    }

    /// The number of the segment appends go to.
    pub fn current(&self) -> u32 {
        self.lock().current
    }

    /// Bytes the segments take.
    pub fn size_on_disk(&self) -> u64 {
        self.lock().segments.values().map(|s| s.size).sum()
    }

    /// Segment files on disk.
    #[cfg(test)]
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }
}

impl Drop for MessageLog {
    fn drop(&mut self) {
        // What deliveries wrote since the last sync; a failure here is what
        // a crash would have lost (and says so).
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "message log not synced when closed");
        }
    }
}

/// The oldest closed segments, up to the first that holds anything live:
/// retiring strictly in order keeps every tombstone until the older
/// versions it removes are gone.
fn dead_segments(inner: &Inner) -> Vec<u32> {
    inner
        .segments
        .iter()
        .take_while(|(&n, s)| n != inner.current && s.live == 0)
        .map(|(&n, _)| n)
        .collect()
}

/// Syncs the log every [`SYNC_EVERY`] while anything waits, and when the
/// current segment nears its end ([`SYNC_AHEAD`]), until the log is
/// dropped.
fn syncer(log: Weak<MessageLog>) {
    loop {
        // Woken early to sync a segment near its end.
        std::thread::park_timeout(SYNC_EVERY);
        let Some(log) = log.upgrade() else { return };
        if log.pending() && log.failed.check().is_ok() {
            if let Err(e) = log.sync() {
                tracing::error!(error = %e, "message log sync failed");
            }
        }
    }
}

/// Records of the log in seq order; see [`MessageLog::iter`].
pub struct Iter {
    log: Arc<MessageLog>,
    /// Where the next chunk starts; `None` once past the end.
    next: Option<u64>,
    rev: bool,
    /// Shared tails too, or heads only.
    whole: bool,
    chunk: std::vec::IntoIter<u64>,
}

const CHUNK: usize = 256;

impl Iterator for Iter {
    type Item = std::io::Result<(u64, Version, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(seq) = self.chunk.next() {
                match self.log.get_part(seq, self.whole) {
                    Ok(Some((version, v))) => return Some(Ok((seq, version, v))),
                    // Removed since the chunk was taken.
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            let from = self.next?;
            let seqs = if self.rev {
                self.log.seqs(..=from, CHUNK, true)
            } else {
                self.log.seqs(from.., CHUNK, false)
            };
            self.next = match (seqs.last(), self.rev) {
                (None, _) => None,
                (Some(&l), false) => l.checked_add(1),
                (Some(&l), true) => l.checked_sub(1),
            };
            if seqs.is_empty() {
                return None;
            }
            self.chunk = seqs.into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(log: &Arc<MessageLog>) -> Vec<(u64, Vec<u8>)> {
        log.iter(0, false)
            .map(|r| r.map(|(s, _, v)| (s, v.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_latest_version_wins_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = MessageLog::open(dir.path(), None).unwrap();
            log.insert(1, b"one").unwrap();
            log.insert(2, b"two").unwrap();
            log.insert(1, b"one again").unwrap();
            log.insert(3, b"three").unwrap();
            assert!(log.remove(3).unwrap());
            assert!(!log.remove(3).unwrap());
            assert_eq!(&log.get(1).unwrap().unwrap()[..], b"one again");
            log.sync().unwrap();
            // Read back from the file, not the buffer.
            assert_eq!(&log.get(2).unwrap().unwrap()[..], b"two");
            log.insert(4, b"four, never synced").unwrap();
        }
        let log = MessageLog::open(dir.path(), None).unwrap();
        assert_eq!(
            all(&log),
            vec![
                (1, b"one again".to_vec()),
                (2, b"two".to_vec()),
                (4, b"four, never synced".to_vec()),
            ],
            "a log closed cleanly keeps what it buffered"
        );
        let rev: Vec<u64> = log.iter(u64::MAX, true).map(|r| r.unwrap().0).collect();
        assert_eq!(rev, vec![4, 2, 1]);
        assert!(log.contains(2) && !log.contains(3));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_damage_elsewhere_is_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = MessageLog::open(dir.path(), None).unwrap();
            log.insert(1, b"kept").unwrap();
            log.insert(2, b"torn").unwrap();
        }
        let path = segfile::path(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        {
            let log = MessageLog::open(dir.path(), None).unwrap();
            assert_eq!(all(&log), vec![(1, b"kept".to_vec())]);
            log.insert(5, b"after the cut").unwrap();
        }
        // What was cut is kept aside, byte for byte.
        let entry = HEADER as u64 + 4;
        let aside = dir.path().join(format!("0000000001.log.cut-at-{entry}"));
        let mut torn = Vec::new();
        push_entry(&mut torn, entry_crc(2, 4, b"torn"), 2, 4, b"torn");
        torn.truncate(torn.len() - 2);
        assert_eq!(std::fs::read(&aside).unwrap(), torn);
        let log = MessageLog::open(dir.path(), None).unwrap();
        assert_eq!(
            all(&log),
            vec![(1, b"kept".to_vec()), (5, b"after the cut".to_vec())]
        );
        drop(log);

        // A flipped byte in a closed segment is damage, not a torn tail.
        std::fs::write(segfile::path(dir.path(), 2), b"").unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = MessageLog::open(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0000000001.log") && e.contains("offset 0"),
            "{e}"
        );
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn old_segments_go_in_order_once_nothing_live_is_in_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = MessageLog::open(dir.path(), None).unwrap();
        let value = vec![7u8; 1 << 20];
        // Three segments: seqs 0..31 fill the first, and so on.
        for seq in 0..70u64 {
            log.insert(seq, &value).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3);
        // Emptying the second does not retire it while the first stays.
        for seq in 31..62 {
            log.remove(seq).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3);
        for seq in 0..30 {
            log.remove(seq).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3, "seq 30 is still live in the first");
        assert_eq!(log.compact(log.current()).unwrap(), 1);
        assert_eq!(log.segments(), 1, "the first two are gone");

        // A segment mostly live is compacted all the same once the dead
        // bytes it keeps behind it outweigh it.
        for seq in 100..170u64 {
            log.insert(seq, &value).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3);
        assert_eq!(
            log.compact(log.current()).unwrap(),
            0,
            "nothing is dead behind it"
        );
        let (first, second) = {
            let inner = log.lock();
            let mut numbers = inner.segments.keys().copied();
            (numbers.next().unwrap(), numbers.next().unwrap())
        };
        let in_second: Vec<u64> = {
            let inner = log.lock();
            (100..170)
                .filter(|s| inner.index[s].segment == second)
                .collect()
        };
        for seq in &in_second {
            log.remove(*seq).unwrap();
        }
        log.sync().unwrap();
        // One entry of the first goes, so what is left of it is smaller
        // than the dead second behind it.
        log.remove(100).unwrap();
        log.sync().unwrap();
        assert!(log.compact(log.current()).unwrap() > 0);
        for n in [first, second] {
            assert!(
                !segfile::path(dir.path(), n).exists(),
                "segment {n} is gone"
            );
        }
        drop(log);
        let log = MessageLog::open(dir.path(), None).unwrap();
        let seqs: Vec<u64> = all(&log).into_iter().map(|(s, _)| s).collect();
        let gone: Vec<u64> = (122..153).collect();
        let expected: Vec<u64> = (30..31)
            .chain(62..70)
            .chain(100..170)
            .filter(|s| !gone.contains(s) && *s != 100)
            .collect();
        assert_eq!(in_second, gone);
        assert_eq!(seqs, expected);
        assert_eq!(&log.get(30).unwrap().unwrap()[..], &value[..]);
    }

    /// The live bytes of each segment, as the log counts them.
    fn live(log: &MessageLog) -> Vec<(u32, u64)> {
        let inner = log.lock();
        inner.segments.iter().map(|(&n, s)| (n, s.live)).collect()
    }

    #[test]
    fn a_shared_entry_reads_as_its_head_and_the_tail_of_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"the body, written once";
        let whole = [b"v1:".as_slice(), body].concat();
        {
            let log = MessageLog::open(dir.path(), None).unwrap();
            assert!(
                !log.insert_sharing_tail(1, b"v0:", body.len()).unwrap(),
                "nothing to share yet"
            );
            log.insert(1, &whole).unwrap();
            let before = log.size_on_disk();
            assert!(log
                .insert_sharing_tail(1, b"version 2:", body.len())
                .unwrap());
            assert_eq!(
                log.size_on_disk() - before,
                (HEADER + REFERENCE + 10) as u64,
                "the body is not written again"
            );
            // Read from the buffer, then from the file.
            assert_eq!(
                &log.get(1).unwrap().unwrap()[..],
                b"version 2:the body, written once"
            );
            log.sync().unwrap();
            assert_eq!(
                &log.get(1).unwrap().unwrap()[..],
                b"version 2:the body, written once"
            );
            // A share of a share takes the same base.
            let v2 = log.version(1).unwrap();
            assert!(log.insert_sharing_tail(1, b"3:", body.len()).unwrap());
            assert_ne!(log.version(1).unwrap(), v2);
            let base = log.lock().index[&1].base.unwrap();
            assert_eq!(
                (base.segment, base.offset, base.tail),
                (1, 0, body.len() as u32)
            );
            // More than the base's tail is not shared.
            assert!(!log.insert_sharing_tail(1, b"", body.len() + 1).unwrap());
            // The whole entry and the latest are live; the one in between is not.
            let live_bytes = (2 * HEADER + whole.len() + REFERENCE + 2) as u64;
            assert_eq!(live(&log), vec![(1, live_bytes)]);
            log.insert(2, b"other").unwrap();
        }
        let log = MessageLog::open(dir.path(), None).unwrap();
        assert_eq!(
            all(&log),
            vec![
                (1, b"3:the body, written once".to_vec()),
                (2, b"other".to_vec())
            ],
            "shared entries read back after a reopen"
        );
        let heads: Vec<(u64, Vec<u8>)> = log
            .heads(0, false)
            .map(|r| r.map(|(s, _, v)| (s, v.to_vec())).unwrap())
            .collect();
        assert_eq!(heads, vec![(1, b"3:".to_vec()), (2, b"other".to_vec())]);
        let live_bytes = (3 * HEADER + whole.len() + REFERENCE + 2 + 5) as u64;
        assert_eq!(
            live(&log),
            vec![(1, live_bytes)],
            "counted the same at open"
        );
        // Written whole again, the base is no longer live.
        log.insert(1, b"whole").unwrap();
        assert_eq!(live(&log), vec![(1, (2 * HEADER + 5 + 5) as u64)]);
    }

    #[test]
    fn a_shared_base_keeps_its_segment_until_compaction_writes_the_message_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = MessageLog::open(dir.path(), None).unwrap();
        let big = vec![7u8; 1 << 20];
        let body = vec![9u8; 4000];
        log.insert(1, &[b"r1".as_slice(), &body].concat()).unwrap();
        // Fill the first segment and start a third; seq 1 changes state
        // in the second.
        for seq in 10..45u64 {
            log.insert(seq, &big).unwrap();
        }
        assert!(log.insert_sharing_tail(1, b"r2", body.len()).unwrap());
        for seq in 45..80u64 {
            log.insert(seq, &big).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3);
        assert_eq!(log.lock().index[&1].segment, 2);
        for seq in 10..80 {
            log.remove(seq).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segments(), 3, "the first holds the body seq 1 shares");
        assert_eq!(log.compact(log.current()).unwrap(), 1);
        assert_eq!(
            log.segments(),
            1,
            "seq 1 written whole; the first two are gone"
        );
        let expected = [b"r2".as_slice(), &body].concat();
        assert_eq!(&log.get(1).unwrap().unwrap()[..], &expected[..]);
        assert!(log.lock().index[&1].base.is_none());
        drop(log);
        let log = MessageLog::open(dir.path(), None).unwrap();
        assert_eq!(all(&log), vec![(1, expected)]);
    }

    #[test]
    fn a_shared_entry_whose_base_is_missing_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![5u8; 300];
        {
            let log = MessageLog::open(dir.path(), None).unwrap();
            log.insert(7, &[b"a".as_slice(), &body].concat()).unwrap();
            let big = vec![1u8; 1 << 20];
            for seq in 10..42u64 {
                log.insert(seq, &big).unwrap();
            }
            assert!(log.insert_sharing_tail(7, b"b", body.len()).unwrap());
        }
        std::fs::remove_file(segfile::path(dir.path(), 1)).unwrap();
        let e = MessageLog::open(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0000000001.log") && e.contains("0000000000000007"),
            "{e}"
        );
        assert!(e.contains("missing"), "{e}");
    }
}
