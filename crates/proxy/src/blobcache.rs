//! The proxy's blob cache: blob files fetched from upstream, kept on disk, bounded in
//! size, surviving restarts.
//!
//! # Layout
//! A blob directory in ZEO's client-cache layout (`zeocache`, see [`zodb::blob`]):
//! `DIR/<oid % 997>/<oid / 997>.<tid hex>.blob`, with `DIR/.layout` and `DIR/tmp` for
//! downloads in progress and downstream uploads. A blob revision never changes, so a file
//! is valid for as long as it exists; there is no index to keep consistent with it.
//!
//! # Downloads
//! [`BlobCache::open_blob`] serves a cached file or fetches it: it registers a download, has
//! upstream `sendBlob` it, and receives the `receiveBlob*` callbacks (routed here by the
//! upstream connection) into a temporary file, written as the chunks arrive (the reader
//! of the upstream connection waits for each write, so a slow disk slows the link rather
//! than filling memory). The file is fsynced and then renamed into place: after a crash,
//! a cached name always holds a complete file. Concurrent requests for the same revision
//! share one download.
//!
//! # Size bound and eviction
//! Files are evicted least recently used first when the total exceeds `max_bytes`. The
//! order survives restarts through the files' access times, which the cache sets itself
//! on every use (so `noatime` mounts do not matter): opening scans the directory once
//! (one `stat` per file) and rebuilds the order. Revisions of objects that upstream
//! invalidates go to the front of the eviction order: only clients still reading an old
//! state need them. A file being sent downstream is open, so evicting it meanwhile
//! (unlinking it) does not disturb the transfer.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, FileTimes};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};
use zodb::blob::{BlobDir, Layout, ZEOCACHE_DIRS};
use zodb::{Oid, StorageError, Tid};

/// Where the blob cache lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct BlobCacheConfig {
    pub dir: PathBuf,
    /// Bound of the files' total size (`blob-cache-size`).
    pub max_bytes: u64,
}

/// Numbers for monitoring.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlobCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub files: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    /// Position in the eviction order (`lru`); 0 for invalidated revisions.
    tick: u64,
}

/// The cached files and their eviction order.
#[derive(Default)]
struct State {
    entries: BTreeMap<(Oid, Tid), Entry>,
    lru: BTreeSet<(u64, Oid, Tid)>,
    bytes: u64,
    tick: u64,
}

impl State {
    fn insert(&mut self, key: (Oid, Tid), size: u64, tick: u64) {
        if let Some(old) = self.entries.insert(key, Entry { size, tick }) {
            self.lru.remove(&(old.tick, key.0, key.1));
            self.bytes -= old.size;
        }
        self.lru.insert((tick, key.0, key.1));
        self.bytes += size;
    }

    fn remove(&mut self, key: (Oid, Tid)) -> Option<Entry> {
        let e = self.entries.remove(&key)?;
        self.lru.remove(&(e.tick, key.0, key.1));
        self.bytes -= e.size;
        Some(e)
    }

    /// Moves `key` to the most recently used end.
    fn touch(&mut self, key: (Oid, Tid)) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&key) {
            self.lru.remove(&(e.tick, key.0, key.1));
            e.tick = tick;
            self.lru.insert((tick, key.0, key.1));
        }
    }

    /// Takes entries out, least recently used first, until at most `max` bytes remain.
    fn evict_to(&mut self, max: u64) -> Vec<(Oid, Tid)> {
        let mut out = Vec::new();
        while self.bytes > max {
            let Some(&(_, oid, tid)) = self.lru.first() else {
                break;
            };
            self.remove((oid, tid));
            out.push((oid, tid));
        }
        out
    }
}

/// A download in progress: where `receiveBlob*` callbacks write.
#[derive(Default)]
struct Download {
    temp: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    size: u64,
    /// `receiveBlobStop` arrived and the file is complete and durable.
    complete: bool,
    failed: Option<String>,
}

type SharedDownload = Arc<tokio::sync::Mutex<Download>>;
/// Held by the one request fetching a revision; the others wait for it.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// See the module documentation.
pub struct BlobCache {
    dir: BlobDir,
    max_bytes: u64,
    state: Mutex<State>,
    /// Downloads waiting for callbacks, by revision.
    downloads: Mutex<HashMap<(Oid, Tid), SharedDownload>>,
    /// One fetch per revision at a time: later requests wait for it, then find the file.
    fetching: Mutex<HashMap<(Oid, Tid), Gate>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl BlobCache {
    /// Opens (creating) the cache directory, removes downloads a previous run left
    /// unfinished, and rebuilds the eviction order from the files (evicting if the bound
    /// shrank).
    pub fn open(config: &BlobCacheConfig) -> io::Result<BlobCache> {
        let dir = BlobDir::open_with_layout(&config.dir, Layout::ZeoCache, true)?;
        let stale = dir.clean_temp()?;
        let started = std::time::Instant::now();
        let mut found: Vec<(SystemTime, Oid, Tid, u64)> = Vec::new();
        for d in fs::read_dir(dir.root())? {
            let d = d?;
            let name = d.file_name();
            let Some(rem) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if rem >= ZEOCACHE_DIRS || !d.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(d.path())? {
                let f = f?;
                let Some((oid, tid)) = f.file_name().to_str().and_then(|n| parse_name(rem, n))
                else {
                    continue;
                };
                let meta = f.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let atime = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((atime, oid, tid, meta.len()));
            }
        }
        found.sort();
        let mut state = State::default();
        for (i, (_, oid, tid, size)) in found.into_iter().enumerate() {
            state.insert((oid, tid), size, i as u64 + 1);
            state.tick = i as u64 + 1;
        }
        let cache = BlobCache {
            dir,
            max_bytes: config.max_bytes,
            state: Mutex::new(state),
            downloads: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        };
        cache.evict();
        let st = cache.stats();
        info!(dir = %cache.dir.root().display(), files = st.files, bytes = st.bytes,
              stale_downloads = stale, ms = started.elapsed().as_millis() as u64, "opened the blob cache");
        Ok(cache)
    }

    /// Where downstream uploads are written (same file system as the cache).
    pub fn temp_dir(&self) -> PathBuf {
        self.dir.temp_dir()
    }

    pub fn stats(&self) -> BlobCacheStats {
        let st = self.state.lock();
        BlobCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: st.bytes,
            files: st.entries.len() as u64,
        }
    }

    /// The cached file of a revision, opened, if there is one.
    fn cached(&self, oid: Oid, tid: Tid) -> Option<File> {
        if !self.state.lock().entries.contains_key(&(oid, tid)) {
            return None;
        }
        match File::open(self.dir.blob_path(oid, tid)) {
            Ok(f) => {
                self.state.lock().touch((oid, tid));
                // The order must survive a restart: record the use in the file's atime.
                if let Err(e) = f.set_times(FileTimes::new().set_accessed(SystemTime::now())) {
                    debug!(%oid, %tid, error = %e, "cannot set a cached blob's access time");
                }
                Some(f)
            }
            Err(e) => {
                // Removed behind our back: forget it.
                debug!(%oid, %tid, error = %e, "cached blob file is gone");
                self.state.lock().remove((oid, tid));
                None
            }
        }
    }

    /// The blob file of revision `tid` of `oid`, opened: from the cache, or fetched by
    /// `fetch` (which makes upstream send it, through [`BlobCache::receive_start`] and
    /// friends, before it returns) and kept.
    ///
    /// A fetch runs in a task of its own: a client that goes away while waiting neither
    /// leaves a download half-registered nor wastes the transfer (the file is kept for
    /// the next request).
    pub async fn open_blob<F, Fut>(
        self: &Arc<Self>,
        oid: Oid,
        tid: Tid,
        fetch: F,
    ) -> Result<File, StorageError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StorageError>> + Send + 'static,
    {
        if let Some(f) = self.cached(oid, tid) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(f);
        }
        let cache = self.clone();
        tokio::spawn(async move { cache.fetch_and_keep(oid, tid, fetch).await })
            .await
            .unwrap_or_else(|e| Err(StorageError::Io(io::Error::other(e))))
    }

    /// The slow path of [`BlobCache::open_blob`].
    async fn fetch_and_keep<F, Fut>(
        &self,
        oid: Oid,
        tid: Tid,
        fetch: F,
    ) -> Result<File, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), StorageError>>,
    {
        let key = (oid, tid);
        let gate = self.fetching.lock().entry(key).or_default().clone();
        let _turn = gate.lock().await;
        // Someone else may have fetched it while we waited.
        if let Some(f) = self.cached(oid, tid) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(f);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let download = Arc::new(tokio::sync::Mutex::new(Download::default()));
        self.downloads.lock().insert(key, download.clone());
        let fetched = fetch().await;
        self.downloads.lock().remove(&key);
        let mut d = download.lock().await;
        let temp = d.temp.take();
        let result = match (fetched, d.complete, d.failed.take()) {
            (Err(e), _, _) => Err(e),
            (Ok(()), true, None) => match &temp {
                Some(t) => self.insert(oid, tid, t, d.size).map_err(StorageError::from),
                None => Err(StorageError::PosKey(oid)),
            },
            (Ok(()), _, Some(why)) => Err(StorageError::Io(io::Error::other(format!(
                "receiving blob {oid} {tid}: {why}"
            )))),
            // Upstream answered without sending the file.
            (Ok(()), false, None) => Err(StorageError::PosKey(oid)),
        };
        d.file = None;
        if result.is_err() {
            if let Some(t) = &temp {
                let _ = zodb::blob::remove_if_exists(t);
            }
        }
        // Only now: a request arriving meanwhile waited at the gate and finds the file.
        self.fetching.lock().remove(&key);
        result
    }

    /// Moves a complete file into the cache as revision `tid` of `oid`; returns it
    /// opened (before eviction, so that even a file larger than the bound is served).
    fn insert(&self, oid: Oid, tid: Tid, temp: &Path, size: u64) -> io::Result<File> {
        let dir = self.dir.oid_dir(oid);
        fs::create_dir_all(&dir)?;
        let path = self.dir.blob_path(oid, tid);
        fs::rename(temp, &path)?;
        let f = File::open(&path)?;
        {
            let mut st = self.state.lock();
            st.tick += 1;
            let tick = st.tick;
            st.insert((oid, tid), size, tick);
        }
        self.evict();
        Ok(f)
    }

    /// Keeps a copy of a file that is committed upstream as revision `tid` of `oid` (a
    /// downstream upload, after its transaction finished): a hard link, so it costs no
    /// copy, and a later read by any client does not need upstream.
    pub fn keep_copy(&self, oid: Oid, tid: Tid, file: &Path) -> io::Result<()> {
        let temp = self.dir.new_temp_path("kept");
        zodb::blob::link_or_copy(file, &temp)?;
        let kept = File::open(&temp)
            .and_then(|f| {
                f.sync_all()?;
                f.metadata()
            })
            .and_then(|m| self.insert(oid, tid, &temp, m.len()).map(drop));
        if kept.is_err() {
            let _ = zodb::blob::remove_if_exists(&temp);
        }
        kept
    }

    /// Removes files until the cache is within its bound.
    fn evict(&self) {
        let victims = self.state.lock().evict_to(self.max_bytes);
        for (oid, tid) in &victims {
            let path = self.dir.blob_path(*oid, *tid);
            if let Err(e) = zodb::blob::remove_if_exists(&path) {
                warn!(file = %path.display(), error = %e, "cannot evict a cached blob");
            }
        }
        if !victims.is_empty() {
            self.evictions
                .fetch_add(victims.len() as u64, Ordering::Relaxed);
            debug!(files = victims.len(), "evicted cached blobs");
        }
    }

    /// Upstream invalidated these objects: their cached revisions are no longer current
    /// and are evicted first. (They stay valid: a revision never changes.)
    pub fn invalidated(&self, oids: &[Oid]) {
        let mut st = self.state.lock();
        if st.entries.is_empty() {
            return;
        }
        for oid in oids {
            let keys: Vec<(Oid, Tid)> = st
                .entries
                .range((*oid, Tid::ZERO)..=(*oid, Tid(u64::MAX)))
                .filter(|(_, e)| e.tick != 0)
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                if let Some(e) = st.entries.get_mut(&key) {
                    let old = e.tick;
                    e.tick = 0;
                    st.lru.remove(&(old, key.0, key.1));
                    st.lru.insert((0, key.0, key.1));
                }
            }
        }
    }

    fn download(&self, oid: Oid, tid: Tid) -> Option<SharedDownload> {
        self.downloads.lock().get(&(oid, tid)).cloned()
    }

    /// `receiveBlobStart`: a download begins. Callbacks for revisions nobody waits for
    /// are ignored.
    pub async fn receive_start(&self, oid: Oid, tid: Tid) {
        let Some(d) = self.download(oid, tid) else {
            debug!(%oid, %tid, "receiveBlobStart for a blob nobody asked for");
            return;
        };
        let mut d = d.lock().await;
        if let Some(old) = d.temp.take() {
            // Sent twice: start over.
            d.file = None;
            let _ = zodb::blob::remove_if_exists(&old);
        }
        let temp = self.dir.new_temp_path("download");
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
        {
            Ok(f) => {
                d.file = Some(f);
                d.temp = Some(temp);
                d.size = 0;
                d.complete = false;
            }
            Err(e) => d.failed = Some(format!("creating {}: {e}", temp.display())),
        }
    }

    /// `receiveBlobChunk`: appends to the download's file.
    pub async fn receive_chunk(&self, oid: Oid, tid: Tid, chunk: Bytes) {
        let Some(d) = self.download(oid, tid) else {
            return;
        };
        let mut d = d.lock().await;
        if d.failed.is_some() {
            return;
        }
        let Some(f) = d.file.as_mut() else {
            d.failed = Some("a chunk before receiveBlobStart".into());
            return;
        };
        match f.write_all(&chunk).await {
            Ok(()) => d.size += chunk.len() as u64,
            Err(e) => d.failed = Some(format!("writing: {e}")),
        }
    }

    /// `receiveBlobStop`: the file is complete; made durable before it is cached.
    pub async fn receive_stop(&self, oid: Oid, tid: Tid) {
        let Some(d) = self.download(oid, tid) else {
            return;
        };
        let mut d = d.lock().await;
        if d.failed.is_some() {
            return;
        }
        let Some(mut f) = d.file.take() else {
            d.failed = Some("receiveBlobStop before receiveBlobStart".into());
            return;
        };
        let synced = async {
            f.flush().await?;
            f.sync_all().await
        };
        match synced.await {
            Ok(()) => d.complete = true,
            Err(e) => d.failed = Some(format!("syncing: {e}")),
        }
    }
}

/// `<oid / 997>.<16 hex digits>.blob` in directory `rem` → the revision.
fn parse_name(rem: u64, name: &str) -> Option<(Oid, Tid)> {
    let stem = name.strip_suffix(zodb::blob::BLOB_SUFFIX)?;
    let (base, hex) = stem.split_once('.')?;
    if hex.len() != 16 {
        return None;
    }
    let base: u64 = base.parse().ok()?;
    let tid = u64::from_str_radix(hex, 16).ok()?;
    let oid = base.checked_mul(ZEOCACHE_DIRS)?.checked_add(rem)?;
    Some((Oid(oid), Tid(tid)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;

    type Fetch = Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send>>;

    fn open(dir: &Path, max_bytes: u64) -> Arc<BlobCache> {
        Arc::new(
            BlobCache::open(&BlobCacheConfig {
                dir: dir.to_path_buf(),
                max_bytes,
            })
            .unwrap(),
        )
    }

    /// Plays upstream: sends `data` through the callbacks, as `sendBlob` would.
    async fn serve(cache: &BlobCache, oid: Oid, tid: Tid, data: &[u8]) {
        cache.receive_start(oid, tid).await;
        for c in data.chunks(7) {
            cache
                .receive_chunk(oid, tid, Bytes::copy_from_slice(c))
                .await;
        }
        cache.receive_stop(oid, tid).await;
    }

    /// A fetch that makes "upstream" send `data`.
    fn sends(cache: &Arc<BlobCache>, oid: Oid, tid: Tid, data: &[u8]) -> impl FnOnce() -> Fetch {
        let (cache, data) = (cache.clone(), data.to_vec());
        move || {
            Box::pin(async move {
                serve(&cache, oid, tid, &data).await;
                Ok(())
            })
        }
    }

    fn never() -> impl FnOnce() -> Fetch {
        || Box::pin(async { panic!("fetched") })
    }

    fn read(mut f: File) -> Vec<u8> {
        use std::io::Read;
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn cached_oids(cache: &BlobCache) -> Vec<u64> {
        cache.state.lock().entries.keys().map(|k| k.0 .0).collect()
    }

    #[test]
    fn names_round_trip() {
        let oid = Oid(123_456_789);
        let tid = Tid(0x03f0_1234_5678_9abc);
        let rel = Layout::ZeoCache.blob_path(oid, tid);
        let rem: u64 = rel.parent().unwrap().to_str().unwrap().parse().unwrap();
        let name = rel.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_name(rem, name), Some((oid, tid)));
        assert_eq!(parse_name(1, "x.blob"), None);
        assert_eq!(parse_name(1, "12.0123.blob"), None);
    }

    #[tokio::test]
    async fn fetches_once_keeps_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 20);
        let (oid, tid) = (Oid(5), Tid(77));
        let f = cache
            .open_blob(oid, tid, sends(&cache, oid, tid, b"the blob's bytes"))
            .await
            .unwrap();
        assert_eq!(read(f), b"the blob's bytes");
        // Cached: no fetch.
        let f = cache.open_blob(oid, tid, never()).await.unwrap();
        assert_eq!(read(f), b"the blob's bytes");
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().misses, 1);
        // Upstream answering without a file: POSKeyError; an error: passed on.
        assert!(matches!(
            cache.open_blob(oid, Tid(78), || async { Ok(()) }).await,
            Err(StorageError::PosKey(_))
        ));
        assert!(matches!(
            cache
                .open_blob(oid, Tid(79), || async {
                    Err(StorageError::Disconnected("gone".into()))
                })
                .await,
            Err(StorageError::Disconnected(_))
        ));
        // An unfinished download leaves nothing behind.
        let c = cache.clone();
        let r = cache
            .open_blob(oid, Tid(80), move || async move {
                c.receive_start(oid, Tid(80)).await;
                c.receive_chunk(oid, Tid(80), Bytes::from_static(b"part"))
                    .await;
                Ok(())
            })
            .await;
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(cache.temp_dir()).unwrap().count(), 0);
        drop(cache);

        let cache = open(dir.path(), 1 << 20);
        assert_eq!(cache.stats().files, 1);
        let f = cache.open_blob(oid, tid, never()).await.unwrap();
        assert_eq!(read(f), b"the blob's bytes");
    }

    #[tokio::test]
    async fn least_recently_used_and_invalidated_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 30);
        let fetch = |n: u64| {
            let cache = cache.clone();
            async move {
                let f = sends(&cache, Oid(n), Tid(n), b"0123456789");
                cache.open_blob(Oid(n), Tid(n), f).await.unwrap()
            }
        };
        fetch(1).await;
        fetch(2).await;
        fetch(3).await;
        // Use 1: 2 is now the least recently used.
        fetch(1).await;
        fetch(4).await;
        assert_eq!(cached_oids(&cache), vec![1, 3, 4]);
        // Invalidate 4: it goes before 1 and 3.
        cache.invalidated(&[Oid(4)]);
        fetch(5).await;
        assert_eq!(cached_oids(&cache), vec![1, 3, 5]);
        assert_eq!(cache.stats().evictions, 2);
        // A file larger than the whole cache is still served.
        let big = cache
            .open_blob(Oid(9), Tid(9), sends(&cache, Oid(9), Tid(9), &[7u8; 100]))
            .await
            .unwrap();
        assert_eq!(read(big).len(), 100);
        assert!(cache.stats().bytes <= 30);
        drop(cache);
        // A smaller bound at the next start evicts down to it, oldest first.
        let cache = open(dir.path(), 10);
        assert!(cache.stats().bytes <= 10);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_download() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 20);
        let fetches = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cache = cache.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                let c = cache.clone();
                let f = cache
                    .open_blob(Oid(1), Tid(2), move || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        serve(&c, Oid(1), Tid(2), b"shared").await;
                        Ok(())
                    })
                    .await
                    .unwrap();
                read(f)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), b"shared");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_requester_that_goes_away_does_not_strand_the_download() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 20);
        let c = cache.clone();
        let slow = move || async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            serve(&c, Oid(3), Tid(3), b"kept anyway").await;
            Ok(())
        };
        // The requester gives up before the download is done.
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(5),
            cache.open_blob(Oid(3), Tid(3), slow),
        )
        .await;
        assert!(r.is_err());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let f = cache.open_blob(Oid(3), Tid(3), never()).await.unwrap();
        assert_eq!(read(f), b"kept anyway");
        assert!(cache.downloads.lock().is_empty());
        assert!(cache.fetching.lock().is_empty());
    }

    #[test]
    fn keep_copy_links_an_upload() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 20);
        let upload = cache.temp_dir().join("upload");
        std::fs::write(&upload, b"uploaded").unwrap();
        cache.keep_copy(Oid(3), Tid(4), &upload).unwrap();
        assert!(upload.exists());
        assert_eq!(read(cache.cached(Oid(3), Tid(4)).unwrap()), b"uploaded");
    }
}
