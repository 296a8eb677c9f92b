//! A throwaway PostgreSQL cluster for the integration tests: `initdb` and `pg_ctl` from
//! ZEORS_PG_BIN (set by scripts/postgres.sh) or the newest /usr/lib/postgresql/*/bin, run
//! as the `postgres` user when the tests run as root, on a unix socket in a temporary
//! directory; stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
    dbs: std::sync::atomic::AtomicUsize,
}

fn pg_bin() -> PathBuf {
    if let Ok(d) = std::env::var("ZEORS_PG_BIN") {
        if Path::new(&d).join("initdb").exists() {
            return PathBuf::from(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/postgres.sh (scripts/test.sh does)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

impl Cluster {
    pub fn start() -> Cluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("zeors-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir")
            .keep();
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let ok = Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown postgres {}", dir.display());
        }
        let c = Cluster {
            bin,
            dir,
            as_postgres,
            dbs: Default::default(),
        };
        c.run(&[
            c.bin.join("initdb").to_str().unwrap(),
            "-D",
            c.dir.join("data").to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ]);
        let opts = format!("-k {} -c listen_addresses='' -c fsync=off", c.dir.display());
        c.run(&[
            c.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            c.dir.join("data").to_str().unwrap(),
            "-l",
            c.dir.join("log").to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "start",
        ]);
        c
    }

    fn run(&self, args: &[&str]) {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c.args(args);
            c
        } else {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let out = cmd.output().expect("run a PostgreSQL program");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn dsn(&self, db: &str) -> String {
        format!("host={} user=postgres dbname={db}", self.dir.display())
    }

    /// A new, empty database; returns its DSN.
    pub async fn new_database(&self) -> String {
        let n = self.dbs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{n}");
        let (client, conn) = tokio_postgres::connect(&self.dsn("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect");
        let driver = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = driver.await;
        self.dsn(&name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            self.run(&[
                self.bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
