//! Files re-read on a timer and swapped in when their contents change: cert-manager and
//! Kubernetes replace a mounted Secret or ConfigMap by swapping a symlink, which changes no
//! modification time of the path the service was given, so contents are compared, not times.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A set of files read together (a certificate and its key; the callers and tokens files).
#[derive(Debug)]
pub(crate) struct WatchedFiles {
    paths: Vec<PathBuf>,
    /// Digest of the contents last returned; the contents themselves (a private key, tokens)
    /// are not kept.
    seen: Option<[u8; 32]>,
    /// A file larger than this is not read (an error names it).
    max_bytes: Option<u64>,
}

impl WatchedFiles {
    pub(crate) fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            seen: None,
            max_bytes: None,
        }
    }

    /// Files of at most `max_bytes` each.
    pub(crate) fn bounded(paths: Vec<PathBuf>, max_bytes: u64) -> Self {
        Self {
            max_bytes: Some(max_bytes),
            ..Self::new(paths)
        }
    }

    /// The next call returns the contents even when unchanged: what they held could not be
    /// used, and is tried again.
    pub(crate) fn forget(&mut self) {
        self.seen = None;
    }

    /// The contents of every file, when they differ from what the last call returned (the
    /// first call always returns them); an error names the file that could not be read.
    pub(crate) fn read_if_changed(&mut self) -> Result<Option<Vec<Vec<u8>>>, String> {
        let contents = self
            .paths
            .iter()
            .map(|path| read(path, self.max_bytes).map_err(|e| format!("{}: {e}", path.display())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for content in &contents {
            digest.update(&(content.len() as u64).to_be_bytes());
            digest.update(content);
        }
        let digest: [u8; 32] = digest.finish().as_ref().try_into().expect("32 bytes");
        if self.seen == Some(digest) {
            return Ok(None);
        }
        self.seen = Some(digest);
        Ok(Some(contents))
    }
}

fn read(path: &std::path::Path, max_bytes: Option<u64>) -> std::io::Result<Vec<u8>> {
    let Some(max_bytes) = max_bytes else {
        return std::fs::read(path);
    };
    let mut contents = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path)?, max_bytes + 1),
        &mut contents,
    )?;
    if contents.len() as u64 > max_bytes {
        return Err(std::io::Error::other(format!(
            "larger than {max_bytes} bytes"
        )));
    }
    Ok(contents)
}

/// Of a set of files re-read: reloads that failed (counted at each attempt: files that cannot
/// be used are tried again at every reload until fixed), and when their contents were last
/// applied (Unix seconds, startup included).
#[derive(Debug, Default)]
pub(crate) struct ReloadStats {
    failures: AtomicU64,
    loaded_at: AtomicI64,
}

impl ReloadStats {
    pub(crate) fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.loaded_at.store(now, Ordering::Relaxed);
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn loaded_at(&self) -> i64 {
        self.loaded_at.load(Ordering::Relaxed)
    }
}

/// A value read from files, replaced by [`Reloading::reload`] when they change. Cheap to clone.
pub(crate) struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
    files: Arc<Mutex<WatchedFiles>>,
    stats: Arc<ReloadStats>,
    /// What the files hold, for the log ("the TLS certificate and key").
    what: &'static str,
    parse: fn(&[Vec<u8>]) -> Result<T, String>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            files: self.files.clone(),
            stats: self.stats.clone(),
            what: self.what,
            parse: self.parse,
        }
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .finish()
    }
}

impl<T> Reloading<T> {
    /// Reads and parses `paths` (passed to `parse` in that order); an error names the file.
    /// `stats` counts this load and the reloads.
    pub(crate) fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        parse: fn(&[Vec<u8>]) -> Result<T, String>,
        stats: Arc<ReloadStats>,
    ) -> Result<Self, String> {
        let mut files = WatchedFiles::new(paths);
        let contents = files
            .read_if_changed()?
            .expect("a first read returns contents");
        let value = parse(&contents)?;
        stats.loaded();
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(value))),
            files: Arc::new(Mutex::new(files)),
            stats,
            what,
            parse,
        })
    }

    pub(crate) fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    pub(crate) fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files; swaps in what they hold if they changed and are valid, else keeps
    /// the value it has, counts the failure and logs why (the error names files and lines,
    /// never their secrets). Files that cannot be used are tried again at the next reload.
    pub(crate) fn reload(&self) {
        let what = self.what;
        let mut files = crate::lock(&self.files);
        let contents = match files.read_if_changed() {
            Ok(Some(contents)) => contents,
            Ok(None) => return,
            Err(error) => {
                self.stats.failed();
                tracing::warn!(%error, "could not re-read {what}; keeping what was loaded before");
                return;
            }
        };
        match (self.parse)(&contents) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                self.stats.loaded();
                tracing::info!("{what} changed: reloaded");
            }
            Err(error) => {
                files.forget();
                self.stats.failed();
                tracing::warn!(%error, "{what} changed but cannot be used; keeping what was loaded before")
            }
        }
    }
}

/// Text of a file read for a [`Reloading`] value.
pub(crate) fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))
}

/// Calls `reload` every `interval` until `stop` is cancelled.
pub(crate) fn every(
    tasks: &TaskTracker,
    interval: Duration,
    stop: CancellationToken,
    mut reload: impl FnMut() + Send + 'static,
) {
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => reload(),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_returned_once_per_change() {
        let dir = std::env::temp_dir().join(format!("ccgw-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        let mut files = WatchedFiles::new(vec![a.clone(), b.clone()]);
        assert_eq!(
            files.read_if_changed().unwrap(),
            Some(vec![b"one".to_vec(), b"two".to_vec()])
        );
        assert_eq!(files.read_if_changed().unwrap(), None);
        // Moving bytes from one file to the other is a change.
        std::fs::write(&a, "onet").unwrap();
        std::fs::write(&b, "wo").unwrap();
        assert!(files.read_if_changed().unwrap().is_some());
        std::fs::remove_file(&b).unwrap();
        assert!(files.read_if_changed().unwrap_err().contains("/b:"));
        // Forgotten contents come again; a bounded file over its bound is an error.
        let mut bounded = WatchedFiles::bounded(vec![a.clone()], 4);
        assert!(bounded.read_if_changed().unwrap().is_some());
        assert_eq!(bounded.read_if_changed().unwrap(), None);
        bounded.forget();
        assert!(bounded.read_if_changed().unwrap().is_some());
        std::fs::write(&a, "fives").unwrap();
        assert!(bounded
            .read_if_changed()
            .unwrap_err()
            .contains("larger than 4 bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_that_cannot_be_used_are_counted_at_every_reload_until_fixed() {
        let dir = std::env::temp_dir().join(format!("ccgw-reload-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("number");
        std::fs::write(&file, "1").unwrap();
        let number = |files: &[Vec<u8>]| -> Result<u32, String> {
            utf8(&files[0], "the number")?
                .parse()
                .map_err(|_| "not a number".to_owned())
        };
        let stats = Arc::new(ReloadStats::default());
        let reloading = Reloading::load("a number", vec![file.clone()], number, stats.clone())
            .expect("valid at first");
        let loaded_at = stats.loaded_at();
        assert!(loaded_at > 1_700_000_000, "{loaded_at}");
        reloading.reload();
        assert_eq!(stats.failures(), 0, "unchanged files are no failure");
        std::fs::write(&file, "one").unwrap();
        for attempt in 1..=3 {
            reloading.reload();
            assert_eq!(stats.failures(), attempt);
            assert_eq!(*reloading.current(), 1, "the valid value stays");
        }
        std::fs::remove_file(&file).unwrap();
        reloading.reload();
        assert_eq!(stats.failures(), 4, "an unreadable file counts too");
        assert_eq!(stats.loaded_at(), loaded_at);
        std::fs::write(&file, "2").unwrap();
        reloading.reload();
        reloading.reload();
        assert_eq!((*reloading.current(), stats.failures()), (2, 4));
        assert!(stats.loaded_at() >= loaded_at);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
