//! `zeo.conf`: what `runzeo -C` reads, checked key by key.
//!
//! Accepts the sections and keys of ZEO's schema (`<zeo>`, storage sections, `<eventlog>`,
//! `<runner>`), so an operator's existing file works unchanged; anything zeors does not know
//! is an error naming the file and line, never silently ignored. A few keys that only make
//! sense for the Python implementation are accepted with a warning.

use crate::zconfig::{self, Section};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct ZeoConf {
    pub zeo: ZeoSection,
    pub storages: Vec<StorageConf>,
    pub log: Option<LogConf>,
    pub warnings: Vec<String>,
}

/// The `<zeo>` section.
#[derive(Debug, Clone, Default)]
pub struct ZeoSection {
    pub addresses: Vec<String>,
    pub read_only: bool,
    pub invalidation_queue_size: Option<usize>,
    pub transaction_timeout: Option<f64>,
    pub pid_filename: Option<PathBuf>,
    pub msgpack: Option<bool>,
    pub ssl: Option<SslConf>,
    /// zeors' own keys (not in runzeo's schema): the bounds against hostile clients and
    /// the unix socket's mode.
    pub max_client_queue: Option<u64>,
    pub max_queued_total: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_iterators: Option<usize>,
    pub max_transaction_size: Option<u64>,
    pub spill_threshold: Option<u64>,
    pub idle_timeout: Option<f64>,
    pub socket_mode: Option<u32>,
}

/// `<ssl>` inside `<zeo>`: server certificate, and the CA that client certificates
/// must be signed by.
#[derive(Debug, Clone)]
pub struct SslConf {
    pub certificate: PathBuf,
    pub key: Option<PathBuf>,
    pub authenticate: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StorageConf {
    pub name: String,
    pub kind: StorageKind,
    /// zc.zrs's `<zrs>` around a `<filestorage>`: replication.
    pub zrs: Option<ZrsConf>,
}

/// Replication settings of a FileStorage (`<zrs>`, or the `--replicate-*` flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZrsConf {
    /// Listen for replicas here (`replicate-to`).
    pub replicate_to: Option<String>,
    /// Follow the primary at this replication address (`replicate-from`).
    pub replicate_from: Option<String>,
    /// Seconds between keep-alives to the primary (`keep-alive-delay`; 0: none).
    pub keep_alive_delay: f64,
    /// zeors: send clients' commits to the primary's ZEO server at this address
    /// (`forward-writes`) instead of refusing them.
    pub forward_writes: Option<String>,
}

#[derive(Debug, Clone)]
pub enum StorageKind {
    File {
        path: PathBuf,
        blob_dir: Option<PathBuf>,
        read_only: bool,
        quota: Option<u64>,
        pack_gc: bool,
        pack_keep_old: bool,
        /// Clients share `blob_dir` and commit files with `storeBlobShared` (zeors' own
        /// key: without it only uploads are accepted).
        shared_blob_dir: bool,
    },
    /// `<zeoclient>` / `<clientstorage>`: proxy mode.
    Upstream {
        servers: Vec<String>,
        storage: String,
        cache_dir: PathBuf,
        cache_size: u64,
        read_only: bool,
        /// The blob cache, or with `shared_blob_dir` upstream's blob directory.
        blob_dir: Option<PathBuf>,
        /// Bound of the blob cache (`blob-cache-size`); `None`: unbounded, as Python.
        blob_cache_size: Option<u64>,
        shared_blob_dir: bool,
        /// `<ssl>` inside `<zeoclient>`: TLS to upstream.
        tls: Option<zeo_tls::ClientTlsSettings>,
    },
    /// `<relstorage>` with `<postgresql>`: a RelStorage database on PostgreSQL.
    Postgres(relstorage::Options),
}

#[derive(Debug, Clone)]
pub struct LogConf {
    /// `None`: standard error.
    pub path: Option<PathBuf>,
    pub level: String,
}

struct Checker<'a> {
    section: &'a Section,
    known: &'static [&'static str],
    ignored: &'static [&'static str],
}

impl<'a> Checker<'a> {
    fn check(&self, warnings: &mut Vec<String>) -> Result<()> {
        for (key, _, line) in &self.section.keys {
            if self.ignored.contains(&key.as_str()) {
                warnings.push(format!(
                    "{}:{line}: `{key}` in <{}> has no effect in zeors; ignored",
                    self.section.file.display(),
                    self.section.kind
                ));
            } else if !self.known.contains(&key.as_str()) {
                bail!(
                    "{}:{line}: unknown key `{key}` in <{}> (known: {})",
                    self.section.file.display(),
                    self.section.kind,
                    self.known.join(", ")
                );
            }
        }
        Ok(())
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.section.value(key).map(|(_, v, _)| v.as_str())
    }

    fn err(&self, key: &str, what: &str) -> anyhow::Error {
        let line = self
            .section
            .value(key)
            .map(|v| v.2)
            .unwrap_or(self.section.line);
        anyhow!("{}:{line}: `{key}` {what}", self.section.file.display())
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => parse_bool(v).ok_or_else(|| self.err(key, "must be true or false")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.str(key).map(|_| self.bool(key, false)).transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(Some)
                .ok_or_else(|| self.err(key, "must be a number")),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => crate::parse_size(v)
                .map(Some)
                .map_err(|e| self.err(key, &e)),
        }
    }

    fn count(&self, key: &str) -> Result<Option<usize>> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| self.err(key, "must be a whole number")),
        }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.str(key).map(PathBuf::from)
    }
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Reads and checks a `zeo.conf`.
pub fn load(path: &Path) -> Result<ZeoConf> {
    let (root, warnings) = zconfig::parse_file(path)?;
    from_root(&root, warnings)
}

pub fn from_root(root: &Section, mut warnings: Vec<String>) -> Result<ZeoConf> {
    if let Some((key, _, line)) = root.keys.first() {
        bail!(
            "{}:{line}: `{key}` outside any section",
            root.file.display()
        );
    }
    let mut conf = ZeoConf::default();
    let mut saw_zeo = false;
    let mut unnamed = 0;
    for section in &root.sections {
        let here = || format!("{}:{}", section.file.display(), section.line);
        match section.kind.as_str() {
            "zeo" => {
                if saw_zeo {
                    bail!("{}: a second <zeo> section", here());
                }
                saw_zeo = true;
                conf.zeo = zeo_section(section, &mut warnings)?;
            }
            "filestorage" | "zeoclient" | "clientstorage" | "relstorage" => {
                let name = match &section.name {
                    Some(n) => n.clone(),
                    None => {
                        unnamed += 1;
                        if unnamed > 1 {
                            bail!("{}: only one storage section may be unnamed", here());
                        }
                        "1".to_string()
                    }
                };
                if conf.storages.iter().any(|s| s.name == name) {
                    bail!("{}: a second storage named {name:?}", here());
                }
                let kind = match section.kind.as_str() {
                    "filestorage" => filestorage_section(section, &mut warnings)?,
                    "relstorage" => relstorage_section(section, &name, &mut warnings)?,
                    _ => upstream_section(section, &name, &mut warnings)?,
                };
                conf.storages.push(StorageConf {
                    name,
                    kind,
                    zrs: None,
                });
            }
            "zrs" => {
                let name = match &section.name {
                    Some(n) => n.clone(),
                    None => {
                        unnamed += 1;
                        if unnamed > 1 {
                            bail!("{}: only one storage section may be unnamed", here());
                        }
                        "1".to_string()
                    }
                };
                if conf.storages.iter().any(|s| s.name == name) {
                    bail!("{}: a second storage named {name:?}", here());
                }
                let (zrs, kind) = zrs_section(section, &mut warnings)?;
                conf.storages.push(StorageConf {
                    name,
                    kind,
                    zrs: Some(zrs),
                });
            }
            "eventlog" | "logger" => conf.log = Some(eventlog_section(section, &mut warnings)?),
            "runner" => warnings.push(format!(
                "{}: <runner> (zdaemon) is not used by zeors; run it under your service manager",
                here()
            )),
            "mappingstorage" | "demostorage" | "blobstorage" | "zlibstorage" | "beforestorage" => {
                bail!(
                    "{}: storage type <{}> is not supported by zeors (filestorage, relstorage or zeoclient)",
                    here(),
                    section.kind
                )
            }
            other => bail!("{}: unknown section <{other}>", here()),
        }
    }
    if !saw_zeo {
        bail!("{}: no <zeo> section", root.file.display());
    }
    if conf.storages.is_empty() {
        bail!(
            "{}: no storage section (<filestorage>, <relstorage> or <zeoclient>)",
            root.file.display()
        );
    }
    conf.warnings = warnings;
    Ok(conf)
}

fn zeo_section(s: &Section, warnings: &mut Vec<String>) -> Result<ZeoSection> {
    let c = Checker {
        section: s,
        known: &[
            "address",
            "read-only",
            "invalidation-queue-size",
            "invalidation-age",
            "transaction-timeout",
            "pid-filename",
            "client-conflict-resolution",
            "msgpack",
            "max-client-queue",
            "max-queued-total",
            "max-connections",
            "max-iterators",
            "max-transaction-size",
            "spill-threshold",
            "idle-timeout",
            "socket-mode",
        ],
        ignored: &[
            "monitor-address",
            "authentication-protocol",
            "authentication-database",
            "authentication-realm",
        ],
    };
    c.check(warnings)?;
    if let Some(false) = c.opt_bool("client-conflict-resolution")? {
        // The default of the Python server is to resolve on the server with the
        // application's classes, which zeors cannot load; clients resolve instead.
        warnings.push(format!(
            "{}:{}: conflicts are always resolved by the clients with zeors (client-conflict-resolution)",
            s.file.display(),
            s.value("client-conflict-resolution").map(|v| v.2).unwrap_or(s.line)
        ));
    }
    // zeors always answers clients older than the queue from the storage itself, as
    // `invalidation-age` asks the Python server to; the value only needs to be valid.
    c.float("invalidation-age")?;
    let queue = match c.str("invalidation-queue-size") {
        None => None,
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| c.err("invalidation-queue-size", "must be an integer"))?,
        ),
    };
    let mut ssl = None;
    for sub in &s.sections {
        if sub.kind != "ssl" {
            bail!(
                "{}:{}: unknown section <{}> in <zeo>",
                sub.file.display(),
                sub.line,
                sub.kind
            );
        }
        let sc = Checker {
            section: sub,
            known: &["certificate", "key", "authenticate", "password-function"],
            ignored: &[],
        };
        sc.check(warnings)?;
        if sc.str("password-function").is_some() {
            bail!(
                "{}:{}: password-function needs Python; use an unencrypted key file",
                sub.file.display(),
                sub.line
            );
        }
        ssl = Some(SslConf {
            certificate: sc.path("certificate").ok_or_else(|| {
                anyhow!(
                    "{}:{}: <ssl> needs a certificate",
                    sub.file.display(),
                    sub.line
                )
            })?,
            key: sc.path("key"),
            authenticate: sc.path("authenticate"),
        });
    }
    Ok(ZeoSection {
        addresses: s.values("address").map(|(_, v, _)| v.clone()).collect(),
        read_only: c.bool("read-only", false)?,
        invalidation_queue_size: queue,
        transaction_timeout: c.float("transaction-timeout")?,
        pid_filename: c.path("pid-filename"),
        msgpack: c.opt_bool("msgpack")?,
        ssl,
        max_client_queue: c.size("max-client-queue")?,
        max_queued_total: c.size("max-queued-total")?,
        max_connections: c.count("max-connections")?,
        max_iterators: c.count("max-iterators")?,
        max_transaction_size: c.size("max-transaction-size")?,
        spill_threshold: c.size("spill-threshold")?,
        idle_timeout: c.float("idle-timeout")?,
        socket_mode: match c.str("socket-mode") {
            None => None,
            Some(v) => Some(
                u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| c.err("socket-mode", "must be an octal mode such as 660"))?,
            ),
        },
    })
}

fn no_subsections(s: &Section) -> Result<()> {
    if let Some(sub) = s.sections.first() {
        bail!(
            "{}:{}: unknown section <{}> in <{}>",
            sub.file.display(),
            sub.line,
            sub.kind,
            s.kind
        );
    }
    Ok(())
}

fn filestorage_section(s: &Section, warnings: &mut Vec<String>) -> Result<StorageKind> {
    let c = Checker {
        section: s,
        known: &[
            "path",
            "blob-dir",
            "create",
            "read-only",
            "quota",
            "pack-gc",
            "pack-keep-old",
            "name",
            "shared-blob-dir",
        ],
        ignored: &["packer"],
    };
    c.check(warnings)?;
    no_subsections(s)?;
    if c.bool("create", false)? {
        // Python empties the file on every start with `create true`; refuse rather than
        // destroy a database because of a leftover setting.
        bail!(
            "{}: `create true` would empty the storage at every start; remove it",
            s.file.display()
        );
    }
    Ok(StorageKind::File {
        path: c.path("path").ok_or_else(|| {
            anyhow!(
                "{}:{}: <filestorage> needs a path",
                s.file.display(),
                s.line
            )
        })?,
        blob_dir: c.path("blob-dir"),
        read_only: c.bool("read-only", false)?,
        quota: c.size("quota")?,
        pack_gc: c.bool("pack-gc", true)?,
        pack_keep_old: c.bool("pack-keep-old", true)?,
        shared_blob_dir: c.bool("shared-blob-dir", false)?,
    })
}

/// `<zrs>`: zc.zrs's replication keys around one `<filestorage>`.
fn zrs_section(s: &Section, warnings: &mut Vec<String>) -> Result<(ZrsConf, StorageKind)> {
    let c = Checker {
        section: s,
        known: &[
            "replicate-to",
            "replicate-from",
            "keep-alive-delay",
            "forward-writes",
        ],
        ignored: &[],
    };
    c.check(warnings)?;
    let kind = match s.sections.as_slice() {
        [inner] if inner.kind == "filestorage" => filestorage_section(inner, warnings)?,
        [inner] => bail!(
            "{}:{}: <zrs> around <{}>: zeors replicates a <filestorage>",
            inner.file.display(),
            inner.line,
            inner.kind
        ),
        _ => bail!(
            "{}:{}: <zrs> needs exactly one <filestorage> section",
            s.file.display(),
            s.line
        ),
    };
    let zrs = ZrsConf {
        replicate_to: c.str("replicate-to").map(str::to_owned),
        replicate_from: c.str("replicate-from").map(str::to_owned),
        keep_alive_delay: c.float("keep-alive-delay")?.unwrap_or(0.0),
        forward_writes: c.str("forward-writes").map(str::to_owned),
    };
    check_zrs(&zrs).map_err(|e| anyhow!("{}:{}: {e}", s.file.display(), s.line))?;
    Ok((zrs, kind))
}

/// zc.zrs's rules for a replicated storage, and ours.
pub fn check_zrs(z: &ZrsConf) -> Result<()> {
    match (&z.replicate_to, &z.replicate_from) {
        (None, None) => bail!("You must specify replicate-to and/or replicate-from."),
        (Some(a), Some(b)) if a == b => {
            bail!("Values for replicate-to and replicate-from must be different.")
        }
        _ => {}
    }
    if z.forward_writes.is_some() && z.replicate_from.is_none() {
        bail!("forward-writes is for a replica (it needs replicate-from)");
    }
    Ok(())
}

fn upstream_section(s: &Section, name: &str, warnings: &mut Vec<String>) -> Result<StorageKind> {
    let c = Checker {
        section: s,
        known: &[
            "server",
            "storage",
            "cache-size",
            "cache-path",
            "name",
            "client",
            "var",
            "blob-dir",
            "shared-blob-dir",
            "blob-cache-size",
            "blob-cache-size-check",
            "read-only",
            "wait",
            "wait-timeout",
        ],
        ignored: &[
            "min-disconnect-poll",
            "max-disconnect-poll",
            "read-only-fallback",
            "drop-cache-rather-verify",
            "client-label",
            "server-sync",
            "username",
            "password",
            "realm",
        ],
    };
    c.check(warnings)?;
    let mut tls = None;
    for sub in &s.sections {
        if sub.kind != "ssl" || tls.is_some() {
            bail!(
                "{}:{}: unexpected section <{}> in <{}> (one <ssl> may be given)",
                sub.file.display(),
                sub.line,
                sub.kind,
                s.kind
            );
        }
        tls = Some(client_ssl_section(sub, warnings)?);
    }
    let servers: Vec<String> = s
        .values("server")
        .map(|(_, v, _)| client_address(v))
        .collect();
    if servers.is_empty() {
        bail!(
            "{}:{}: <{}> needs at least one `server`",
            s.file.display(),
            s.line,
            s.kind
        );
    }
    // The stock client keeps its persistent cache in `var/client-storage.zec` (or
    // `cache-path`); ours is a directory next to where that file would be.
    let storage = c.str("storage").unwrap_or("1").to_string();
    let cache_dir = if let Some(p) = c.path("cache-path") {
        PathBuf::from(format!("{}.zeors-cache", p.display()))
    } else {
        let var = c.path("var").unwrap_or_else(|| PathBuf::from("var"));
        let client = c.str("client").unwrap_or(name);
        var.join(format!("{client}-{storage}.zeors-cache"))
    };
    Ok(StorageKind::Upstream {
        servers,
        storage,
        cache_dir,
        cache_size: c.size("cache-size")?.unwrap_or(20 << 20),
        read_only: c.bool("read-only", false)?,
        blob_dir: c.path("blob-dir"),
        blob_cache_size: c.size("blob-cache-size")?,
        shared_blob_dir: c.bool("shared-blob-dir", false)?,
        tls,
    })
}

/// ZEO's client `<ssl>`: `certificate`, `key`, `authenticate`, `check-hostname` (default
/// true), `server-hostname`.
fn client_ssl_section(
    sub: &Section,
    warnings: &mut Vec<String>,
) -> Result<zeo_tls::ClientTlsSettings> {
    let sc = Checker {
        section: sub,
        known: &[
            "certificate",
            "key",
            "authenticate",
            "check-hostname",
            "server-hostname",
            "password-function",
        ],
        ignored: &[],
    };
    sc.check(warnings)?;
    if sc.str("password-function").is_some() {
        bail!(
            "{}:{}: password-function needs Python; use an unencrypted key file",
            sub.file.display(),
            sub.line
        );
    }
    Ok(zeo_tls::ClientTlsSettings {
        certificate: sc.path("certificate"),
        key: sc.path("key"),
        authenticate: sc.path("authenticate"),
        check_hostname: sc.bool("check-hostname", true)?,
        server_hostname: sc.str("server-hostname").map(str::to_string),
    })
}

/// `<relstorage NAME>` around `<postgresql>`, as RelStorage's `component.xml` defines
/// them. Keys about RelStorage's client-side caches have no meaning on a server and are
/// ignored with a warning; features zeors does not implement are refused with their line.
fn relstorage_section(s: &Section, name: &str, warnings: &mut Vec<String>) -> Result<StorageKind> {
    let c = Checker {
        section: s,
        known: &[
            "name",
            "read-only",
            "blob-dir",
            "shared-blob-dir",
            "blob-cache-size",
            "keep-history",
            "pack-gc",
            "pack-prepack-only",
            "pack-skip-prepack",
            "cache-local-mb",
            "commit-lock-timeout",
            "create-schema",
            "replica-conf",
            "ro-replica-conf",
            "cache-servers",
            "cache-module-name",
            "cache-local-storage",
        ],
        ignored: &[
            "blob-cache-size-check",
            "blob-cache-size-check-external",
            "blob-chunk-size",
            "replica-timeout",
            "revert_when_stale",
            "poll-interval",
            "pack-batch-timeout",
            "pack-commit-busy-delay",
            "cache-prefix",
            "cache-local-dir",
            "cache-local-dir-count",
            "cache-local-dir-read-count",
            "cache-local-dir-compress",
            "cache-local-dir-write-max-size",
            "cache-local-object-max",
            "cache-local-compression",
            "cache-delta-size-limit",
            "commit-lock-id",
        ],
    };
    c.check(warnings)?;
    let refuse = |key: &str, why: &str| -> Result<()> {
        if c.str(key).is_some() {
            return Err(c.err(key, why));
        }
        Ok(())
    };
    refuse("replica-conf", "(replicas) is not implemented by zeors")?;
    refuse("ro-replica-conf", "(replicas) is not implemented by zeors")?;
    refuse("cache-servers", "(memcache) is not implemented by zeors")?;
    refuse(
        "cache-module-name",
        "(memcache) is not implemented by zeors",
    )?;
    refuse("cache-local-storage", "is not implemented by zeors")?;
    if c.bool("shared-blob-dir", false)? {
        return Err(c.err(
            "shared-blob-dir",
            "true is not implemented by zeors: blobs are kept in the database (set it to false)",
        ));
    }
    if !c.bool("pack-gc", true)? {
        return Err(c.err(
            "pack-gc",
            "false is not implemented by zeors: packs always collect garbage",
        ));
    }
    if c.bool("pack-prepack-only", false)? || c.bool("pack-skip-prepack", false)? {
        return Err(anyhow!(
            "{}:{}: pack-prepack-only / pack-skip-prepack are not implemented by zeors",
            s.file.display(),
            s.line
        ));
    }
    let mut dsn = None;
    for sub in &s.sections {
        match sub.kind.as_str() {
            "postgresql" => {
                if dsn.is_some() {
                    bail!(
                        "{}:{}: a second database section in <relstorage>",
                        sub.file.display(),
                        sub.line
                    );
                }
                let pc = Checker {
                    section: sub,
                    known: &["dsn"],
                    ignored: &["driver"],
                };
                pc.check(warnings)?;
                no_subsections(sub)?;
                dsn = Some(pc.str("dsn").unwrap_or("").to_string());
            }
            other => bail!(
                "{}:{}: <{other}> is not supported by zeors; only <postgresql>",
                sub.file.display(),
                sub.line
            ),
        }
    }
    let Some(dsn) = dsn else {
        bail!(
            "{}:{}: <relstorage> needs a <postgresql> section with a dsn",
            s.file.display(),
            s.line
        );
    };
    let mut o = relstorage::Options::new(dsn);
    o.layout = relstorage::Layout::from_keep_history(c.bool("keep-history", true)?);
    o.create_schema = c.bool("create-schema", true)?;
    o.read_only = c.bool("read-only", false)?;
    o.blob_dir = c.path("blob-dir");
    o.blob_cache_bytes = c.size("blob-cache-size")?;
    o.name = c.str("name").unwrap_or(name).to_string();
    if let Some(mb) = c.str("cache-local-mb") {
        let mb: usize = mb
            .parse()
            .map_err(|_| c.err("cache-local-mb", "must be a number of megabytes"))?;
        o.cache_bytes = mb << 20;
    }
    if let Some(t) = c.float("commit-lock-timeout")? {
        if t <= 0.0 {
            return Err(c.err(
                "commit-lock-timeout",
                "must be a positive number of seconds",
            ));
        }
        o.commit_lock_timeout = std::time::Duration::from_secs_f64(t);
    }
    Ok(StorageKind::Postgres(o))
}

/// A `server` address as ZConfig reads a client's `socket-connection-address`: a bare
/// port (`8100`) or a port with an empty host (`:8100`) is on this machine.
fn client_address(v: &str) -> String {
    let port = v.strip_prefix(':').unwrap_or(v);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{port}")
    } else {
        v.to_string()
    }
}

fn eventlog_section(s: &Section, warnings: &mut Vec<String>) -> Result<LogConf> {
    let c = Checker {
        section: s,
        known: &["level", "name", "propagate"],
        ignored: &[],
    };
    c.check(warnings)?;
    let mut conf = LogConf {
        path: None,
        level: level_filter(c.str("level").unwrap_or("INFO")),
    };
    for sub in &s.sections {
        match sub.kind.as_str() {
            "logfile" => {
                let lc = Checker {
                    section: sub,
                    known: &[
                        "path",
                        "level",
                        "format",
                        "dateformat",
                        "max-size",
                        "old-files",
                        "when",
                        "interval",
                    ],
                    ignored: &[],
                };
                lc.check(warnings)?;
                if let Some(path) = lc.str("path") {
                    conf.path = match path {
                        "STDERR" | "STDOUT" => None,
                        p => Some(PathBuf::from(p)),
                    };
                }
                if let Some(level) = lc.str("level") {
                    conf.level = level_filter(level);
                }
            }
            "syslog" | "email-notifier" | "http-logger" => warnings.push(format!(
                "{}:{}: <{}> logging is not supported by zeors; ignored",
                sub.file.display(),
                sub.line,
                sub.kind
            )),
            other => bail!(
                "{}:{}: unknown section <{other}> in <eventlog>",
                sub.file.display(),
                sub.line
            ),
        }
    }
    Ok(conf)
}

/// ZConfig logger levels as a tracing filter.
fn level_filter(level: &str) -> String {
    match level.to_ascii_uppercase().as_str() {
        "CRITICAL" | "FATAL" | "ERROR" => "error",
        "WARN" | "WARNING" => "warn",
        "INFO" => "info",
        "DEBUG" | "BLATHER" => "debug",
        "TRACE" | "ALL" | "NOTSET" => "trace",
        _ => "info",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> Result<ZeoConf> {
        let (root, w) = zconfig::parse_str(text, "zeo.conf")?;
        from_root(&root, w)
    }

    #[test]
    fn a_typical_buildout_zeo_conf() {
        let c = conf(
            "%define INSTANCE /srv/zeo\n<zeo>\n  address 8100\n  read-only false\n  invalidation-queue-size 100\n  pid-filename $INSTANCE/var/ZEO.pid\n  transaction-timeout 30\n</zeo>\n<filestorage 1>\n  path $INSTANCE/var/filestorage/Data.fs\n  blob-dir $INSTANCE/var/blobstorage\n  pack-gc false\n</filestorage>\n<eventlog>\n  level info\n  <logfile>\n    path $INSTANCE/var/log/zeoserver.log\n    format %(asctime)s %(message)s\n  </logfile>\n</eventlog>\n<runner>\n  program $INSTANCE/bin/runzeo\n</runner>\n",
        )
        .unwrap();
        assert_eq!(c.zeo.addresses, ["8100"]);
        assert_eq!(c.zeo.transaction_timeout, Some(30.0));
        assert_eq!(c.storages.len(), 1);
        match &c.storages[0].kind {
            StorageKind::File { path, pack_gc, .. } => {
                assert_eq!(path, &PathBuf::from("/srv/zeo/var/filestorage/Data.fs"));
                assert!(!pack_gc);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.log.unwrap().path,
            Some(PathBuf::from("/srv/zeo/var/log/zeoserver.log"))
        );
        assert!(c.warnings.iter().any(|w| w.contains("runner")));
    }

    #[test]
    fn a_bare_port_is_an_upstream_on_this_machine() {
        assert_eq!(client_address("8100"), "127.0.0.1:8100");
        assert_eq!(client_address(":8100"), "127.0.0.1:8100");
        assert_eq!(
            client_address("zeo.example.net:8100"),
            "zeo.example.net:8100"
        );
        assert_eq!(client_address("/run/zeo.sock"), "/run/zeo.sock");
    }

    #[test]
    fn proxy_conf_with_zeoclient() {
        let c = conf(
            "<zeo>\n address 127.0.0.1:8100\n</zeo>\n<zeoclient main>\n server remote:8100\n server backup:8100\n storage 1\n cache-size 20GB\n var /var/cache/zeo\n client proxy\n</zeoclient>\n",
        )
        .unwrap();
        match &c.storages[0].kind {
            StorageKind::Upstream {
                servers,
                cache_dir,
                cache_size,
                ..
            } => {
                assert_eq!(servers.len(), 2);
                assert_eq!(*cache_size, 20 << 30);
                assert_eq!(
                    cache_dir,
                    &PathBuf::from("/var/cache/zeo/proxy-1.zeors-cache")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.storages[0].name, "main");
    }

    #[test]
    fn unknown_keys_and_sections_are_errors_with_lines() {
        let e = conf(
            "<zeo>\n address 1\n bogus-key 1\n</zeo>\n<filestorage>\n path x\n</filestorage>\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("zeo.conf:3"), "{e}");
        let e = conf("<zeo>\n address 1\n</zeo>\n<filestorage>\n path x\n</filestorage>\n<weird>\n</weird>\n").unwrap_err();
        assert!(e.to_string().contains("unknown section <weird>"), "{e}");
        let e = conf(
            "<zeo>\n address 1\n read-only maybe\n</zeo>\n<filestorage>\n path x\n</filestorage>\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains(":3"), "{e}");
        assert!(conf("<zeo>\n address 1\n</zeo>\n").is_err());
    }

    #[test]
    fn several_storages_and_unnamed_rules() {
        let c = conf("<zeo>\n address 1\n</zeo>\n<filestorage>\n path a\n</filestorage>\n<filestorage 2>\n path b\n</filestorage>\n").unwrap();
        assert_eq!(
            c.storages
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(conf("<zeo>\n address 1\n</zeo>\n<filestorage>\n path a\n</filestorage>\n<filestorage 1>\n path b\n</filestorage>\n").is_err());
    }

    #[test]
    fn the_example_in_the_repository_is_valid() {
        let c = conf(include_str!("../../../zeo.conf.example")).unwrap();
        assert_eq!(c.zeo.addresses.len(), 2);
        assert_eq!(c.zeo.transaction_timeout, Some(30.0));
        assert_eq!(c.storages.len(), 1);
    }

    #[test]
    fn blob_settings() {
        let c = conf("<zeo>\n address 1\n</zeo>\n<filestorage>\n path a\n blob-dir /srv/blobs\n</filestorage>\n<zeoclient p>\n server up:8100\n blob-dir /var/blobcache\n blob-cache-size 2GB\n blob-cache-size-check 10\n shared-blob-dir false\n</zeoclient>\n").unwrap();
        match &c.storages[0].kind {
            StorageKind::File { blob_dir, .. } => {
                assert_eq!(blob_dir.as_deref(), Some(Path::new("/srv/blobs")))
            }
            other => panic!("{other:?}"),
        }
        match &c.storages[1].kind {
            StorageKind::Upstream {
                blob_dir,
                blob_cache_size,
                shared_blob_dir,
                ..
            } => {
                assert_eq!(blob_dir.as_deref(), Some(Path::new("/var/blobcache")));
                assert_eq!(*blob_cache_size, Some(2 << 30));
                assert!(!shared_blob_dir);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zrs_sections() {
        let c = conf("%import zc.zrs\n<zeo>\n address 8100\n</zeo>\n<zrs>\n replicate-to 5000\n <filestorage>\n  path primary.fs\n  blob-dir blobs\n </filestorage>\n</zrs>\n").unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.storages[0].name, "1");
        assert_eq!(
            c.storages[0].zrs,
            Some(ZrsConf {
                replicate_to: Some("5000".into()),
                ..ZrsConf::default()
            })
        );
        let c = conf("<zeo>\n address 8100\n</zeo>\n<zrs main>\n replicate-from primary:5000\n replicate-to 5001\n keep-alive-delay 60\n forward-writes primary:8100\n <filestorage>\n  path replica.fs\n </filestorage>\n</zrs>\n").unwrap();
        let z = c.storages[0].zrs.clone().unwrap();
        assert_eq!(c.storages[0].name, "main");
        assert_eq!(z.replicate_from.as_deref(), Some("primary:5000"));
        assert_eq!(z.keep_alive_delay, 60.0);
        assert_eq!(z.forward_writes.as_deref(), Some("primary:8100"));
        for (bad, why) in [
            ("<zrs>\n <filestorage>\n  path a\n </filestorage>\n</zrs>\n", "must specify"),
            ("<zrs>\n replicate-to 1\n replicate-from 1\n <filestorage>\n  path a\n </filestorage>\n</zrs>\n", "must be different"),
            ("<zrs>\n replicate-to 1\n</zrs>\n", "exactly one"),
            ("<zrs>\n replicate-to 1\n <mappingstorage>\n </mappingstorage>\n</zrs>\n", "replicates a <filestorage>"),
            ("<zrs>\n replicate-to 1\n bogus 2\n <filestorage>\n  path a\n </filestorage>\n</zrs>\n", "unknown key"),
        ] {
            let e = conf(&format!("<zeo>\n address 1\n</zeo>\n{bad}")).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn relstorage_section_as_runzeo_reads_it() {
        let c = conf("%import relstorage\n<zeo>\n address 1\n</zeo>\n<relstorage main>\n keep-history false\n create-schema false\n blob-dir /var/blobs\n blob-cache-size 1GB\n commit-lock-timeout 10\n cache-local-mb 100\n cache-local-dir /tmp/x\n <postgresql>\n  driver psycopg2\n  dsn host=/run/postgresql dbname=zodb\n </postgresql>\n</relstorage>\n").unwrap();
        match &c.storages[0].kind {
            StorageKind::Postgres(o) => {
                assert_eq!(o.dsn, "host=/run/postgresql dbname=zodb");
                assert_eq!(o.layout, relstorage::Layout::HistoryFree);
                assert!(!o.create_schema);
                assert_eq!(o.blob_dir.as_deref(), Some(Path::new("/var/blobs")));
                assert_eq!(o.blob_cache_bytes, Some(1 << 30));
                assert_eq!(o.commit_lock_timeout, std::time::Duration::from_secs(10));
                assert_eq!(o.cache_bytes, 100 << 20);
            }
            other => panic!("{other:?}"),
        }
        assert!(c.warnings.iter().any(|w| w.contains("cache-local-dir")));
        assert!(!c.warnings.iter().any(|w| w.contains("%import")));
        let e = conf("<zeo>\n address 1\n</zeo>\n<relstorage>\n shared-blob-dir true\n <postgresql>\n  dsn x\n </postgresql>\n</relstorage>\n").unwrap_err();
        assert!(e.to_string().contains(":5:"), "{e}");
        let e = conf("<zeo>\n address 1\n</zeo>\n<relstorage>\n replica-conf /x\n <postgresql>\n  dsn x\n </postgresql>\n</relstorage>\n").unwrap_err();
        assert!(
            e.to_string().contains(":5:") && e.to_string().contains("replica"),
            "{e}"
        );
        let e = conf(
            "<zeo>\n address 1\n</zeo>\n<relstorage>\n <mysql>\n  db x\n </mysql>\n</relstorage>\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains(":5:"), "{e}");
        let e = conf("<zeo>\n address 1\n</zeo>\n<relstorage>\n bogus 1\n <postgresql>\n  dsn x\n </postgresql>\n</relstorage>\n").unwrap_err();
        assert!(e.to_string().contains(":5:"), "{e}");
        assert!(conf("<zeo>\n address 1\n</zeo>\n<relstorage>\n</relstorage>\n").is_err());
    }

    #[test]
    fn ssl_section() {
        let c = conf("<zeo>\n address 1\n <ssl>\n  certificate server.pem\n  key server_key.pem\n  authenticate clients.pem\n </ssl>\n</zeo>\n<filestorage>\n path a\n</filestorage>\n").unwrap();
        let ssl = c.zeo.ssl.unwrap();
        assert_eq!(ssl.authenticate, Some(PathBuf::from("clients.pem")));
    }

    #[test]
    fn bounds_socket_mode_and_tls_to_upstream() {
        let c = conf("<zeo>\n address 1\n max-queued-total 64MB\n max-connections 50\n max-iterators 7\n max-transaction-size 1GB\n spill-threshold 1MB\n idle-timeout 30\n socket-mode 0660\n</zeo>\n<filestorage>\n path a\n blob-dir b\n shared-blob-dir true\n</filestorage>\n<zeoclient p>\n server up:8100\n <ssl>\n  certificate c.pem\n  key k.pem\n  authenticate s.pem\n  check-hostname false\n  server-hostname zodb.org\n </ssl>\n</zeoclient>\n").unwrap();
        assert_eq!(c.zeo.max_queued_total, Some(64 << 20));
        assert_eq!(c.zeo.max_connections, Some(50));
        assert_eq!(c.zeo.max_iterators, Some(7));
        assert_eq!(c.zeo.max_transaction_size, Some(1 << 30));
        assert_eq!(c.zeo.spill_threshold, Some(1 << 20));
        assert_eq!(c.zeo.idle_timeout, Some(30.0));
        assert_eq!(c.zeo.socket_mode, Some(0o660));
        assert!(matches!(
            c.storages[0].kind,
            StorageKind::File {
                shared_blob_dir: true,
                ..
            }
        ));
        match &c.storages[1].kind {
            StorageKind::Upstream { tls: Some(t), .. } => {
                assert_eq!(t.authenticate.as_deref(), Some(Path::new("s.pem")));
                assert!(!t.check_hostname);
                assert_eq!(t.server_hostname.as_deref(), Some("zodb.org"));
            }
            other => panic!("{other:?}"),
        }
        let e = conf(
            "<zeo>\n address 1\n socket-mode 999\n</zeo>\n<filestorage>\n path a\n</filestorage>\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("socket-mode"), "{e}");
        let e = conf("<zeo>\n address 1\n</zeo>\n<zeoclient>\n server a:1\n <ssl>\n  password-function x.y\n </ssl>\n</zeoclient>\n").unwrap_err();
        assert!(e.to_string().contains("password-function"), "{e}");
    }
}
