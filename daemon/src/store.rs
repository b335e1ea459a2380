//! The store: the only module that touches sled.
//!
//! Trees: `meta` (schema version), `integrations`, `connections` (keyed
//! `integration \0 connection`), `oauth_profiles`, `protocol_profiles`,
//! `inbound_users`, and the message trees of [`crate::queue`] (see
//! [`MessageTrees`]). Catalog records and attempts are JSON, so they can be
//! read with any sled tool. Message records, written on every enqueue and
//! delivery, are bincode, and live outside sled, in the message log
//! ([`crate::msglog`]). A message's record and a body up to
//! [`INLINE_BODY_MAX`] are one value (see [`message_value`]): one append to
//! enqueue, one read to deliver; larger bodies go to the body log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Db, Transactional, Tree};

use crate::bodylog::{BodyLog, BodyRef};
use crate::catalog::{Catalog, Entry};
use crate::model::Connection;
use crate::msglog::MessageLog;

/// The layout version this build writes. A store with a larger number was
/// written by a newer Outbox and is refused rather than misread; a smaller
/// one is upgraded in place when opened.
///
/// 2: the attempt that delivered a message lives in its record; the
/// `finished` retention index of version 1 is gone.
/// 3: message values carry a layout byte; a body up to
/// [`INLINE_BODY_MAX`] is stored inside its message's value.
/// 4: message records are written in bincode (layouts 3 and 4); bodies
/// over [`INLINE_BODY_MAX`] go to the body log ([`crate::bodylog`], layout
/// 5). Records and bodies of version 3 are read where they are, and a
/// record goes binary when it is next written, so the upgrade rewrites
/// nothing.
/// 5: message records move from sled's `messages` tree to the message log
/// ([`crate::msglog`]), as they are; the tree is dropped.
/// 6: a new version of a message record may share its inline body with the
/// message-log entry that holds it (a shared entry, see [`crate::msglog`]),
/// so a change of state does not write the body again. The upgrade
/// rewrites nothing; a build that reads up to 5 refuses the store instead
/// of taking a shared entry for damage.
pub const SCHEMA_VERSION: u32 = 6;

/// Bodies up to this size are stored inside their message's value: one
/// write to enqueue, one read to deliver. Larger ones are appended to the
/// body log, so a state change does not rewrite them, a scan of records
/// does not read them, and sled never holds a large value. Measured with
/// 1 KiB bodies: sending them to the log as well (a threshold of 256 bytes)
/// took the enqueue rate from 0.44 to 0.38–0.39 of the bench's baseline
/// (a `pwrite` per message and one more `fdatasync` per flush round), for
/// no gain in delivery, so bodies this small stay inline.
pub const INLINE_BODY_MAX: usize = 4 * 1024;

/// Message value layouts (the first byte): how the record is encoded and
/// where the body is. This build writes the binary layouts; the JSON ones
/// (schema 3) are still read, and a record goes binary when it is next
/// written.
const LAYOUT_INLINE_JSON: u8 = 1;
const LAYOUT_APART_JSON: u8 = 2;
const LAYOUT_INLINE: u8 = 3;
const LAYOUT_APART: u8 = 4;
const LAYOUT_LOGGED: u8 = 5;

/// Where a stored message's body is.
#[derive(Debug, PartialEq)]
pub enum StoredBody<'a> {
    /// After the record, in the same value.
    Inline(&'a [u8]),
    /// In the `bodies` tree under the message's key (schema 3 and older;
    /// this build no longer writes bodies there).
    Apart,
    /// In the body log.
    Logged(BodyRef),
}

/// How a stored message record is encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RecordFormat {
    /// serde_json, as schema 3 wrote it.
    Json,
    /// bincode 2 (serde, [`record_config`]).
    Binary,
}

/// The bincode configuration of message records. The limit bounds what a
/// damaged record can make the decoder allocate.
pub fn record_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 1 << 24 }>()
}

/// A stored message value taken apart by [`message_parts`].
#[derive(Debug, PartialEq)]
pub struct MessageParts<'a> {
    pub format: RecordFormat,
    pub record: &'a [u8],
    pub body: StoredBody<'a>,
}

/// A message as stored: the layout byte, the length of the record (u32 BE),
/// the record (written by `record`, in [`RecordFormat::Binary`]), then the
/// inline body bytes as they came, or the [`BodyRef`] of a logged body.
pub fn message_value(body: StoredBody<'_>, record: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (layout, tail) = match &body {
        StoredBody::Inline(b) => (LAYOUT_INLINE, b.len()),
        StoredBody::Apart => (LAYOUT_APART, 0),
        StoredBody::Logged(_) => (LAYOUT_LOGGED, BodyRef::SIZE),
    };
    let mut v = framed(layout, 192 + tail, record);
    match body {
        StoredBody::Inline(b) => v.extend_from_slice(b),
        StoredBody::Apart => {}
        StoredBody::Logged(r) => r.encode(&mut v),
    }
    v
}

/// The start of a [`message_value`] with an inline body, up to the body:
/// what a later version of a record writes when it shares the body with
/// the version that holds it.
/// The body's `len` bytes go after it, so room is left for them.
pub fn message_head(len: usize, record: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    framed(LAYOUT_INLINE, 192 + len, record)
}

/// The layout byte, the record's length (u32 BE) and the record written by
/// `record`, with room for `more` bytes after it.
fn framed(layout: u8, more: usize, record: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + more);
    v.push(layout);
    v.extend_from_slice(&[0; 4]);
    record(&mut v);
    let len = (v.len() - 5) as u32;
    v[1..5].copy_from_slice(&len.to_be_bytes());
    v
}

/// The record and the body of a value written by [`message_value`] (or by
/// schema 3, in JSON).
pub fn message_parts(v: &[u8]) -> Result<MessageParts<'_>, String> {
    let (format, place) = match v.first() {
        Some(&LAYOUT_INLINE) => (RecordFormat::Binary, LAYOUT_INLINE),
        Some(&LAYOUT_APART) => (RecordFormat::Binary, LAYOUT_APART),
        Some(&LAYOUT_LOGGED) => (RecordFormat::Binary, LAYOUT_LOGGED),
        Some(&LAYOUT_INLINE_JSON) => (RecordFormat::Json, LAYOUT_INLINE),
        Some(&LAYOUT_APART_JSON) => (RecordFormat::Json, LAYOUT_APART),
        Some(b) => return Err(format!("unknown message layout {b}")),
        None => return Err("empty value".into()),
    };
    let [_, a, b, c, d, rest @ ..] = v else {
        return Err(format!("{} bytes, shorter than the header", v.len()));
    };
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    if len > rest.len() {
        return Err(format!(
            "record length {len} is past the end of the value ({} bytes)",
            v.len()
        ));
    }
    let (record, tail) = rest.split_at(len);
    let body = match (place, tail) {
        (LAYOUT_INLINE, body) => StoredBody::Inline(body),
        (LAYOUT_LOGGED, tail) => StoredBody::Logged(BodyRef::decode(tail).ok_or_else(|| {
            format!(
                "{} bytes where a {}-byte body reference was expected",
                tail.len(),
                BodyRef::SIZE
            )
        })?),
        (_, []) => StoredBody::Apart,
        (_, tail) => {
            return Err(format!(
                "{} bytes after a record whose body is stored apart",
                tail.len()
            ))
        }
    };
    Ok(MessageParts {
        format,
        record,
        body,
    })
}

const SCHEMA_KEY: &[u8] = b"schema_version";
const LOCK_FILE: &str = "outboxd.lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {dir} is in use by another outboxd (lock file {lock}); stop it first or use another data_dir")]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("store in {dir} was written by a newer Outbox (schema version {found}, this build reads up to {supported}); upgrade outboxd")]
    TooNew {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("store in {dir} cannot be opened: {reason}")]
    Open { dir: PathBuf, reason: String },
    #[error("store record {tree}/{key} is damaged: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// The trees that hold messages; [`crate::queue`] gives them meaning.
#[derive(Clone)]
pub struct MessageTrees {
    /// `seq` → message record, with its body inline up to
    /// [`INLINE_BODY_MAX`]; see [`message_value`]. In `data_dir/messages/`.
    pub messages: std::sync::Arc<MessageLog>,
    /// `seq` → body of a message whose body is stored apart (schema 3 and
    /// older; read and pruned, no longer written).
    pub bodies: Tree,
    /// Bodies over [`INLINE_BODY_MAX`], in `data_dir/bodies/`.
    pub body_log: std::sync::Arc<BodyLog>,
    /// `seq ++ attempt number` (u64 BE ++ u32 BE) → attempt (JSON).
    pub attempts: Tree,
    /// `integration \0 idempotency key` → `seq`.
    pub idempotency: Tree,
    /// Set after each write the queue makes to the sled trees above;
    /// [`Store::commit`] flushes sled only when it is set.
    pub sled_written: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MessageTrees {
    /// Marks a write to sled, for the next [`Store::commit`]. Called after
    /// the write and before the writer waits for a commit.
    pub fn wrote_sled(&self) {
        self.sled_written
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Version 2 to 3: each JSON record gets the layout header, with its body
/// left where it is (apart). Nothing moves, so a crash part way loses
/// nothing: a record still in JSON starts with `{` and is framed next time.
fn frame_records(db: &Db, dir: &Path) -> Result<(), StoreError> {
    let messages = db.open_tree("messages")?;
    for item in messages.iter() {
        let (k, v) = item?;
        if v.first() == Some(&b'{') {
            let value = framed(LAYOUT_APART_JSON, v.len(), |out| out.extend_from_slice(&v));
            messages.insert(&k, value)?;
        }
    }
    durable(db, dir)
}

/// Version 4 to 5: every record of the `messages` tree is appended to the
/// message log as it is, the log synced, version 5 written, and only then
/// the tree dropped. A crash before version 5 is on disk leaves the tree
/// whole and the schema at 4: the next start removes the partial log and
/// copies again.
fn move_records(db: &Db, log: &MessageLog, dir: &Path) -> Result<(), StoreError> {
    let messages = db.open_tree("messages")?;
    for item in messages.iter() {
        let (k, v) = item?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                tree: "messages",
                key: format!("{k:?}"),
                reason: format!("a key of {} bytes where 8 were expected", k.len()),
            })?;
        log.insert(seq, &v)?;
    }
    log.sync()?;
    drop(messages);
    // Version 5 is written before the tree goes: a start that finds
    // version 4 copies again from a whole tree, and one that finds 5 with
    // the tree still there drops it.
    db.open_tree("meta")?
        .insert(SCHEMA_KEY, &5u32.to_be_bytes())?;
    durable(db, dir)?;
    db.drop_tree("messages")?;
    durable(db, dir)
}

/// Whether sled has a tree called `name`.
fn has_tree(db: &Db, name: &str) -> bool {
    db.tree_names()
        .iter()
        .any(|t| t.as_ref() == name.as_bytes())
}

/// sled's flush and an fsync of its log, as [`Store::flush`] does.
fn durable(db: &Db, dir: &Path) -> Result<(), StoreError> {
    db.flush()?;
    File::open(dir.join("db").join("db"))?.sync_data()?;
    Ok(())
}

/// The open store. Cloning is cheap (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    db: Db,
    dir: PathBuf,
    integrations: Tree,
    connections: Tree,
    oauth_profiles: Tree,
    protocol_profiles: Tree,
    inbound_users: Tree,
    pub messages: MessageTrees,
    /// sled's log file, fsynced after each flush.
    log: std::sync::Arc<File>,
    /// Held for the life of the store: a second outboxd on the same data dir
    /// is refused with a clear message instead of sled's lock error.
    _lock: std::sync::Arc<File>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    lock: lock_path,
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        lock.set_len(0)?;
        writeln!(lock, "{}", std::process::id())?;

        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError::Open {
                dir: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        let lock = std::sync::Arc::new(lock);
        let open_log = || {
            MessageLog::open(&dir.join("messages"), Some(lock.clone())).map_err(|e| {
                StoreError::Open {
                    dir: dir.to_path_buf(),
                    reason: e.to_string(),
                }
            })
        };
        let meta = db.open_tree("meta")?;
        let message_log = match meta.get(SCHEMA_KEY)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        tree: "meta",
                        key: "schema_version".into(),
                        reason: format!("{} bytes where 4 were expected", v.len()),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::TooNew {
                        dir: dir.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found < 2 {
                    // Version 1 kept a `finished` index for pruning;
                    // version 2 prunes by scanning records in seq order.
                    db.drop_tree("finished")?;
                }
                if found < 3 {
                    frame_records(&db, dir)?;
                }
                if found < 5 {
                    // A message log beside a store older than 5 is what an
                    // interrupted upgrade left: the records are copied from
                    // sled afresh.
                    let logged = dir.join("messages");
                    if logged.exists() {
                        std::fs::remove_dir_all(&logged)?;
                    }
                }
                let message_log = open_log()?;
                if found < 5 {
                    move_records(&db, &message_log, dir)?;
                } else if has_tree(&db, "messages") {
                    // An upgrade that stopped after writing version 5.
                    db.drop_tree("messages")?;
                }
                if found < SCHEMA_VERSION {
                    meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                    durable(&db, dir)?;
                }
                message_log
            }
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
                open_log()?
            }
        };
        Ok(Store {
            integrations: db.open_tree("integrations")?,
            connections: db.open_tree("connections")?,
            oauth_profiles: db.open_tree("oauth_profiles")?,
            protocol_profiles: db.open_tree("protocol_profiles")?,
            inbound_users: db.open_tree("inbound_users")?,
            messages: MessageTrees {
                messages: message_log,
                bodies: db.open_tree("bodies")?,
                body_log: std::sync::Arc::new(BodyLog::open(&dir.join("bodies"))?),
                attempts: db.open_tree("attempts")?,
                idempotency: db.open_tree("idempotency")?,
                sled_written: Default::default(),
            },
            log: std::sync::Arc::new(File::open(dir.join("db").join("db"))?),
            db,
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new id, larger than every earlier one (sled persists the counter).
    pub fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// Writes everything inserted so far to disk. Catalog changes and
    /// shutdown use it.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.sync(true)
    }

    /// What an enqueue needs on disk before it is acknowledged: the body
    /// log, the message log, and sled only if the queue wrote to it since
    /// the last commit (an idempotency key). A round of enqueues without
    /// keys is then one `fdatasync` instead of two plus sled's flush. sled
    /// keeps its own id counter durable: it flushes, blocking, each time
    /// the counter passes another million.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.sync(false)
    }

    /// The one flush path of [`Store::flush`] and [`Store::commit`]; sled
    /// goes too when `all` or when the queue marked a write to it.
    fn sync(&self, all: bool) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        // Bodies first: a record on disk must never point at a body that
        // is not.
        self.messages.body_log.sync()?;
        // Records before sled: every key this flush makes durable has
        // its record on disk first.
        self.messages.messages.sync()?;
        if self.messages.sled_written.swap(false, Ordering::AcqRel) || all {
            // sled 0.34 makes its log durable with sync_file_range, which
            // does not reach the drive's cache or the file's metadata; an
            // fsync of the log file does.
            let synced = self
                .db
                .flush()
                .map_err(StoreError::from)
                .and_then(|_| Ok(self.log.sync_data()?));
            if synced.is_err() {
                self.messages.wrote_sled();
            }
            synced?;
        }
        Ok(())
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.messages.messages.size_on_disk()
    }

    /// Reads the whole catalog.
    pub fn load_catalog(&self) -> Result<Catalog, StoreError> {
        let mut catalog = Catalog {
            integrations: read_tree(&self.integrations, "integrations")?,
            oauth_profiles: read_tree(&self.oauth_profiles, "oauth_profiles")?,
            protocol_profiles: read_tree(&self.protocol_profiles, "protocol_profiles")?,
            inbound_users: read_tree(&self.inbound_users, "inbound_users")?,
        };
        let connections: BTreeMap<String, Connection> =
            read_tree(&self.connections, "connections")?;
        for (key, connection) in connections {
            let integration = key.split('\0').next().unwrap_or_default();
            match catalog.integrations.get_mut(integration) {
                Some(e) => e.spec.connections.push(connection),
                None => {
                    return Err(StoreError::Corrupt {
                        tree: "connections",
                        key: key.replace('\0', "/"),
                        reason: "its integration is missing".into(),
                    })
                }
            }
        }
        for e in catalog.integrations.values_mut() {
            e.spec.connections.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(catalog)
    }

    /// Persists `new` in one transaction across the catalog trees (writing
    /// only what differs from `old`), then flushes: an admin change answers
    /// only once it is on disk.
    pub fn save_catalog(&self, old: &Catalog, new: &Catalog) -> Result<(), StoreError> {
        let (old_i, old_c) = split(old);
        let (new_i, new_c) = split(new);
        let diffs = [
            diff(&old_i, &new_i)?,
            diff(&old_c, &new_c)?,
            diff(
                &encode_map(&old.oauth_profiles)?,
                &encode_map(&new.oauth_profiles)?,
            )?,
            diff(
                &encode_map(&old.protocol_profiles)?,
                &encode_map(&new.protocol_profiles)?,
            )?,
            diff(
                &encode_map(&old.inbound_users)?,
                &encode_map(&new.inbound_users)?,
            )?,
        ];
        if diffs.iter().all(Vec::is_empty) {
            return Ok(());
        }
        (
            &self.integrations,
            &self.connections,
            &self.oauth_profiles,
            &self.protocol_profiles,
            &self.inbound_users,
        )
            .transaction(|(a, b, c, d, e)| {
                for (tree, ops) in [a, b, c, d, e].into_iter().zip(&diffs) {
                    for (key, value) in ops {
                        match value {
                            Some(v) => tree.insert(key.as_bytes(), v.as_slice())?,
                            None => tree.remove(key.as_bytes())?,
                        };
                    }
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })?;
        self.flush()
    }
}

type Encoded = BTreeMap<String, Vec<u8>>;

/// The catalog as integration records (without connections) and connection
/// records keyed `integration \0 connection`.
fn split(catalog: &Catalog) -> (Encoded, Encoded) {
    let mut integrations = BTreeMap::new();
    let mut connections = BTreeMap::new();
    for (name, entry) in &catalog.integrations {
        let mut bare: Entry = entry.clone();
        for c in std::mem::take(&mut bare.spec.connections) {
            connections.insert(format!("{name}\0{}", c.name), json(&c));
        }
        integrations.insert(name.clone(), json(&bare));
    }
    (integrations, connections)
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (string keys, no custom failing
    // serializers) to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn encode_map<T: serde::Serialize>(map: &BTreeMap<String, T>) -> Result<Encoded, StoreError> {
    Ok(map.iter().map(|(k, v)| (k.clone(), json(v))).collect())
}

/// Inserts and removals that turn `old` into `new`.
#[allow(clippy::type_complexity)]
fn diff(old: &Encoded, new: &Encoded) -> Result<Vec<(String, Option<Vec<u8>>)>, StoreError> {
    let mut ops = Vec::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            ops.push((k.clone(), Some(v.clone())));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            ops.push((k.clone(), None));
        }
    }
    Ok(ops)
}

fn read_tree<T: serde::de::DeserializeOwned>(
    tree: &Tree,
    name: &'static str,
) -> Result<BTreeMap<String, T>, StoreError> {
    let mut out = BTreeMap::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let value = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
            tree: name,
            key: key.replace('\0', "/"),
            reason: e.to_string(),
        })?;
        out.insert(key, value);
    }
    Ok(out)
}

/// For tests that reopen a store they have just dropped: retries `open`,
/// for up to 5 s, while it fails on sled's lock or the data dir's. sled
/// locks its file, and its threads of the database just dropped can hold
/// that lock for a moment; the message log's thread can hold the data
/// dir's lock while it finishes a sync. A restarted daemon is a new
/// process, whose old threads are gone. A `Store` still alive after 5 s
/// fails the test as the leak it is.
#[cfg(test)]
pub(crate) fn when_unlocked<T, E: std::fmt::Display>(
    open: impl Fn() -> Result<T, E>,
) -> Result<T, E> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open() {
            Err(e)
                if (e.to_string().contains("could not acquire lock")
                    || e.to_string().contains("in use by another outboxd"))
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), 1 << 20).unwrap();
        let second = Store::open(dir.path(), 1 << 20);
        assert!(matches!(second, Err(StoreError::Locked { .. })));
        let text = second.err().unwrap().to_string();
        assert!(text.contains("in use by another outboxd"), "{text}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let e = when_unlocked(|| Store::open(dir.path(), 1 << 20))
            .err()
            .unwrap();
        assert!(
            matches!(e, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 1),
            "{e}"
        );
    }

    #[test]
    fn a_version_1_store_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, &1u32.to_be_bytes())
                .unwrap();
            db.open_tree("finished").unwrap().insert(b"k", b"").unwrap();
            let json = br#"{"seq":7}"#;
            db.open_tree("messages")
                .unwrap()
                .insert(7u64.to_be_bytes(), json)
                .unwrap();
            db.open_tree("bodies")
                .unwrap()
                .insert(7u64.to_be_bytes(), b"body")
                .unwrap();
            db.flush().unwrap();
        }
        let store = when_unlocked(|| Store::open(dir.path(), 1 << 20)).unwrap();
        let v = store.messages.messages.get(7).unwrap().unwrap();
        drop(store);
        let db = when_unlocked(|| sled::open(dir.path().join("db"))).unwrap();
        let schema = db
            .open_tree("meta")
            .unwrap()
            .get(SCHEMA_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(schema.as_ref(), SCHEMA_VERSION.to_be_bytes());
        assert!(!has_tree(&db, "finished"));
        assert!(
            !has_tree(&db, "messages"),
            "the record moved to the message log"
        );
        assert_eq!(
            message_parts(&v).unwrap(),
            MessageParts {
                format: RecordFormat::Json,
                record: &br#"{"seq":7}"#[..],
                body: StoredBody::Apart
            }
        );
        let body = db
            .open_tree("bodies")
            .unwrap()
            .get(7u64.to_be_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(body.as_ref(), b"body", "the body stays where it was");
    }

    #[test]
    fn an_upgrade_to_5_cut_short_copies_again_from_sled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, &4u32.to_be_bytes())
                .unwrap();
            db.open_tree("messages")
                .unwrap()
                .insert(7u64.to_be_bytes(), &b"seven"[..])
                .unwrap();
            db.flush().unwrap();
            // A copy that stopped part way, with a record since pruned
            // from sled by the older build.
            let log = MessageLog::open(&dir.path().join("messages"), None).unwrap();
            log.insert(9, b"pruned since").unwrap();
        }
        let store = when_unlocked(|| Store::open(dir.path(), 1 << 20)).unwrap();
        let log = &store.messages.messages;
        assert_eq!(&log.get(7).unwrap().unwrap()[..], b"seven");
        assert!(log.get(9).unwrap().is_none(), "the partial copy is gone");
        // Version 5 with the tree still there (stopped before it was
        // dropped): it is dropped, and the log stands.
        store
            .db
            .open_tree("messages")
            .unwrap()
            .insert(8u64.to_be_bytes(), &b"left"[..])
            .unwrap();
        drop(store);
        let store = when_unlocked(|| Store::open(dir.path(), 1 << 20)).unwrap();
        assert!(!has_tree(&store.db, "messages"));
        assert_eq!(
            &store.messages.messages.get(7).unwrap().unwrap()[..],
            b"seven"
        );
    }

    #[test]
    fn message_values_split_back_and_bad_ones_are_named() {
        let parts = |format, record, body| MessageParts {
            format,
            record,
            body,
        };
        let v = message_value(StoredBody::Inline(b"x"), |out| {
            out.extend_from_slice(b"rec")
        });
        assert_eq!(
            message_parts(&v).unwrap(),
            parts(RecordFormat::Binary, b"rec", StoredBody::Inline(b"x"))
        );
        assert!(message_parts(&v[..3]).unwrap_err().contains("shorter"));
        let apart = message_value(StoredBody::Apart, |out| out.extend_from_slice(b"rec"));
        let r = BodyRef {
            segment: 2,
            offset: 9,
            len: 300,
            crc: 7,
        };
        let logged = message_value(StoredBody::Logged(r), |out| out.extend_from_slice(b"rec"));
        assert_eq!(
            message_parts(&logged).unwrap(),
            parts(RecordFormat::Binary, b"rec", StoredBody::Logged(r))
        );
        assert!(message_parts(&logged[..logged.len() - 1])
            .unwrap_err()
            .contains("body reference"));
        assert_eq!(
            message_parts(&apart).unwrap(),
            parts(RecordFormat::Binary, b"rec", StoredBody::Apart)
        );
        let mut bad = apart.clone();
        bad.push(0);
        assert!(message_parts(&bad).unwrap_err().contains("stored apart"));
        assert!(message_parts(&[3, 0, 0, 0, 9, 1])
            .unwrap_err()
            .contains("past the end"));
        // Schema 3 values: JSON records, both layouts.
        assert_eq!(
            message_parts(&[1, 0, 0, 0, 2, b'{', b'}', b'x']).unwrap(),
            parts(RecordFormat::Json, b"{}", StoredBody::Inline(b"x"))
        );
        assert_eq!(
            message_parts(&[2, 0, 0, 0, 2, b'{', b'}']).unwrap(),
            parts(RecordFormat::Json, b"{}", StoredBody::Apart)
        );
        assert!(message_parts(b"{}").unwrap_err().contains("layout 123"));
        assert!(message_parts(b"").unwrap_err().contains("empty"));
    }
}
