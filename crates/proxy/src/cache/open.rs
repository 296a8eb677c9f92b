//! Opening the cache: the redb index and the segment files, checked against each other
//! (records whose checksums fail, segments the index does not know) before anything is served.

use super::*;

impl Cache {
    /// Opens (or creates) the cache in `config.dir`. An index that cannot be used is set
    /// aside as `index.redb.bad` with a warning, and the cache starts empty. Blocks on
    /// `fsync`; bounded work (no scan of data or index).
    pub fn open(config: CacheConfig) -> Result<Cache, CacheError> {
        Self::open_on(fsio::real(), config)
    }

    /// [`Cache::open`] with the cache directory on the file system `fs` (a simulated disk
    /// in the crash tests).
    pub fn open_on(fs: Arc<dyn Fs>, config: CacheConfig) -> Result<Cache, CacheError> {
        let started = std::time::Instant::now();
        let cache = match Self::try_open(&fs, &config) {
            Ok(cache) => cache,
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Unusable(why)) => {
                warn!(dir = %config.dir.display(), %why,
                      "the proxy cache index is unusable; setting it aside and starting empty");
                let index = config.dir.join(INDEX_FILE);
                match fs.rename(&index, &config.dir.join(BAD_INDEX_FILE)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                match Self::try_open(&fs, &config) {
                    Ok(cache) => cache,
                    Err(OpenError::Fatal(e)) => return Err(e),
                    Err(OpenError::Unusable(why)) => return Err(CacheError::Corrupt(why)),
                }
            }
        };
        info!(dir = %config.dir.display(), last_tid = %cache.last_tid(),
              entries = cache.counters.entries.load(Ordering::Relaxed),
              bytes = cache.counters.bytes.load(Ordering::Relaxed),
              max_bytes = config.max_bytes, index_memory = config.effective_index_memory(),
              elapsed_ms = started.elapsed().as_millis() as u64, "proxy cache opened");
        Ok(cache)
    }

    pub(super) fn try_open(fs: &Arc<dyn Fs>, config: &CacheConfig) -> Result<Cache, OpenError> {
        // redb may panic rather than fail on some damaged files (debug builds do so on
        // purpose): a panic here means an unusable index, not a crashed proxy.
        match catch_unwind(AssertUnwindSafe(|| Self::try_open_inner(fs, config))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                Err(OpenError::Unusable(format!(
                    "opening the index panicked: {what}"
                )))
            }
        }
    }

    pub(super) fn try_open_inner(
        fs: &Arc<dyn Fs>,
        config: &CacheConfig,
    ) -> Result<Cache, OpenError> {
        let segments_dir = config.dir.join(SEGMENTS_DIR);
        fsio::create_dir_all(&**fs, &segments_dir).map_err(io_err)?;
        let index_path = config.dir.join(INDEX_FILE);
        let created = !fsio::exists(&**fs, &index_path);
        let index_memory = config.effective_index_memory();
        let db = redb_file::open(fs, &index_path, index_memory)?;
        if created {
            fs.sync_dir(&config.dir).map_err(io_err)?;
        }
        let persisted = Self::read_persisted(&db)?;
        let Persisted {
            last_tid,
            epochs,
            purge_floor,
            clean,
            referenced,
            entries,
        } = persisted;

        // One setup transaction: the tables exist, the format is stamped, the clean-close
        // marker is gone (from now on the segment it names may grow past the length it
        // records), the log fits its configured size.
        let mut txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_FORMAT, index::FORMAT)?;
            meta.insert(index::META_LAST_TID, last_tid.0)?;
            meta.insert(index::META_GENERATION, u64::from(epochs.current))?;
            meta.remove(index::META_CLEAN_SEG)?;
            meta.remove(index::META_CLEAN_LEN)?;
            drop(meta);
            EntryTables::open(&txn)?;
            txn.open_table(index::EPOCHS)?;
            txn.open_table(index::PACK_FLOORS)?;
            let mut log = txn.open_table(index::INVALIDATIONS)?;
            while log.len()? > config.invalidation_log_size as u64 {
                log.pop_first()?;
            }
        }
        txn.set_quick_repair(true);
        txn.commit()?;

        // Segment files: keep those the index mentions, delete the rest (written after the
        // last durable commit, or already evicted). Purge entries whose segment is gone.
        let mut on_disk = BTreeMap::new();
        for dirent in fs.read_dir(&segments_dir).map_err(io_err)? {
            if let Some(seg) = dirent.name.to_str().and_then(segment::parse_segment_name) {
                on_disk.insert(seg, segments_dir.join(&dirent.name));
            }
        }
        let next_seg = on_disk
            .keys()
            .chain(referenced.iter())
            .max()
            .map_or(1, |&m| m.saturating_add(1));
        let referenced: BTreeSet<u64> = referenced.into_iter().collect();
        for (seg, path) in &on_disk {
            if !referenced.contains(seg) {
                debug!(seg, "deleting an unreferenced cache segment");
                fs.remove_file(path).map_err(io_err)?;
            }
        }
        let mut files = HashMap::new();
        let mut sizes = BTreeMap::new();
        let mut active = None;
        let mut missing = Vec::new();
        for &seg in &referenced {
            let Some(path) = on_disk.get(&seg) else {
                missing.push(seg);
                continue;
            };
            let reuse = clean.filter(|&(s, _)| s == seg).map(|(_, len)| len);
            let mode = if reuse.is_some() {
                Mode::Write
            } else {
                Mode::Read
            };
            let file = fs.open(path, mode).map_err(io_err)?;
            if !segment::check_segment_header(&*file, seg).map_err(io_err)? {
                warn!(seg, "cache segment has a bad header; dropping its entries");
                missing.push(seg);
                continue;
            }
            let mut size = file.size().map_err(io_err)?;
            if let Some(len) = reuse {
                // After a clean close the last segment continues; cut anything past the
                // length the close recorded (there should be nothing).
                if size >= len && len >= SEGMENT_HEADER_LEN && len <= u64::from(u32::MAX) {
                    if size > len {
                        file.set_len(len).map_err(io_err)?;
                        size = len;
                    }
                    active = Some(Active {
                        seg,
                        file: file.clone(),
                        len,
                    });
                }
            }
            files.insert(seg, file);
            sizes.insert(seg, size);
        }
        let total_bytes = sizes.values().sum();
        let max_bytes = config.max_bytes;
        let segment_size = segment_size(max_bytes);
        let cache = Cache {
            fs: fs.clone(),
            segments_dir,
            max_bytes,
            segment_size,
            max_record: (segment_size - SEGMENT_HEADER_LEN)
                .min(max_bytes / 4)
                .min(u64::from(u32::MAX)),
            log_size: config.invalidation_log_size,
            db,
            writer: Mutex::new(Writer {
                active,
                next_seg,
                sizes,
                total_bytes,
                unsynced: BTreeSet::new(),
                dir_unsynced: false,
                evicting: BTreeSet::new(),
                last_tid,
                // A new cache knows nothing of upstream yet: no answer can be checked
                // until the first transaction (or drop_current) starts the window.
                recent: RecentInvalidations::new(
                    if last_tid == Tid::ZERO {
                        Tid::MAX
                    } else {
                        last_tid
                    },
                    usize::try_from(index_memory / INDEX_MEMORY_PER_RECENT_OID)
                        .unwrap_or(usize::MAX),
                ),
            }),
            files: RwLock::new(files),
            epochs: RwLock::new(epochs),
            purge_floor: AtomicU64::new(purge_floor.0),
            accessed: Mutex::new(Accessed::new(
                usize::try_from(max_bytes / 2048)
                    .unwrap_or(usize::MAX)
                    .clamp(4096, 2_000_000),
            )),
            last_tid: AtomicU64::new(last_tid.0),
            poisoned: AtomicBool::new(false),
            closed: false,
            counters: Counters::default(),
        };
        cache.counters.bytes.store(total_bytes, Ordering::Relaxed);
        cache.counters.entries.store(entries, Ordering::Relaxed);
        {
            let mut w = cache.writer.lock();
            for seg in missing {
                warn!(seg, "cache segment is missing; dropping its entries");
                cache
                    .evict_segment(&mut w, seg, false)
                    .map_err(OpenError::Fatal)?;
            }
            // The configured size may have shrunk.
            cache.make_room(&mut w, 0).map_err(OpenError::Fatal)?;
            if purge_floor > Tid::ZERO {
                info!(floor = %purge_floor, "finishing the purge of entries a pack removed");
                cache
                    .purge_noncurrent(&mut w, purge_floor)
                    .map_err(OpenError::Fatal)?;
            }
        }
        Ok(cache)
    }

    pub(super) fn read_persisted(db: &Database) -> Result<Persisted, OpenError> {
        let txn = db.begin_read()?;
        let meta = match txn.open_table(index::META) {
            Ok(meta) => meta,
            // A new database (or one whose first setup never committed).
            Err(TableError::TableDoesNotExist(_)) => {
                return Ok(Persisted {
                    last_tid: Tid::ZERO,
                    epochs: Epochs::default(),
                    purge_floor: Tid::ZERO,
                    clean: None,
                    referenced: Vec::new(),
                    entries: 0,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let get =
            |key: &str| -> Result<Option<u64>, OpenError> { Ok(meta.get(key)?.map(|g| g.value())) };
        match get(index::META_FORMAT)? {
            Some(index::FORMAT) => {}
            other => return Err(OpenError::Unusable(format!("index format {other:?}"))),
        }
        let last_tid = Tid(get(index::META_LAST_TID)?.unwrap_or(0));
        let generation = u32::try_from(get(index::META_GENERATION)?.unwrap_or(0))
            .map_err(|_| OpenError::Unusable("generation out of range".into()))?;
        let clean = get(index::META_CLEAN_SEG)?.zip(get(index::META_CLEAN_LEN)?);
        let mut epochs = Epochs {
            current: generation,
            ends: HashMap::new(),
            floors: HashMap::new(),
        };
        for item in txn.open_table(index::EPOCHS)?.iter()? {
            let (k, v) = item?;
            epochs.ends.insert(k.value(), Tid(v.value()));
        }
        match txn.open_table(index::PACK_FLOORS) {
            Ok(floors) => {
                for item in floors.iter()? {
                    let (k, v) = item?;
                    epochs.floors.insert(k.value(), Tid(v.value()));
                }
            }
            // A cache written before packs were forwarded.
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let purge_floor = Tid(get(index::META_PURGE_FLOOR)?.unwrap_or(0));
        let current = txn.open_table(index::CURRENT)?;
        let noncurrent = txn.open_table(index::NONCURRENT)?;
        let locations = txn.open_table(index::LOCATIONS)?;
        Ok(Persisted {
            last_tid,
            epochs,
            purge_floor,
            clean,
            referenced: index::referenced_segments(&locations)?,
            entries: current.len()? + noncurrent.len()?,
        })
    }
}
