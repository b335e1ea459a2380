//! Numbered segment files in a directory, as the body log
//! ([`crate::bodylog`]) and the message log ([`crate::msglog`]) keep them:
//! `NNNNNNNNNN.log`, opened for reading and writing, with every error naming
//! the log and the file it is about.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Segment `n` of the log in `dir`.
pub fn path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:010}.log"))
}

/// An I/O error of `log` that names the file or directory it is about.
pub fn at(log: &str, path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{log} {}: {e}", path.display()))
}

/// Makes `dir` if it is missing, with its directory entry durable.
pub fn create_dir(log: &str, dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| at(log, dir, e))?;
    match dir.parent() {
        Some(parent) => sync_dir(log, parent),
        None => Ok(()),
    }
}

/// The numbers of the segments in `dir`, ascending.
pub fn numbers(log: &str, dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| at(log, dir, e))? {
        let name = entry.map_err(|e| at(log, dir, e))?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Opens segment `n`, made if missing.
pub fn open(log: &str, dir: &Path, n: u32) -> std::io::Result<File> {
    let path = path(dir, n);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| at(log, &path, e))
}

/// Opens a new segment `n` and makes its directory entry durable.
pub fn create(log: &str, dir: &Path, n: u32) -> std::io::Result<File> {
    let file = open(log, dir, n)?;
    sync_dir(log, dir)?;
    Ok(file)
}

/// `fsync`s directory `dir`, so the entries made or removed in it last.
pub fn sync_dir(log: &str, dir: &Path) -> std::io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(log, dir, e))
}

/// The number after segment `n`.
pub fn next(log: &str, dir: &Path, n: u32) -> std::io::Result<u32> {
    n.checked_add(1).ok_or_else(|| {
        at(
            log,
            &path(dir, n),
            std::io::Error::other("no segment number is left after this one"),
        )
    })
}

/// A log's failed `fdatasync`. After one, the kernel may have dropped the
/// pages it could not write, so a later success would not mean they are on
/// disk. Nothing is acknowledged again until a restart reads back what is
/// there: every later sync fails with the first error.
#[derive(Default)]
pub struct SyncFailure(OnceLock<String>);

impl SyncFailure {
    /// The first failure, if a sync of this log has failed.
    pub fn check(&self) -> std::io::Result<()> {
        match self.0.get() {
            Some(e) => Err(std::io::Error::other(format!(
                "{e} (an earlier sync failed; restart outboxd)"
            ))),
            None => Ok(()),
        }
    }

    /// Records the failure `e` of a sync of `log` (logging the first) and
    /// gives it back.
    pub fn record(&self, log: &str, e: std::io::Error) -> std::io::Error {
        if self.0.set(e.to_string()).is_ok() {
            tracing::error!(error = %e, "{log} sync failed: no message is acknowledged until outboxd is restarted");
        }
        e
    }
}
