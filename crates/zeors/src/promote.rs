//! `zeors promote`: makes a running replica a primary.
//!
//! The server promotes on SIGUSR1 (its follower stops after the transaction it is
//! applying, and commits are accepted from then on); this tool sends the signal to the
//! process named by `--pid`/`--pid-file` and, with `--address`, waits until the
//! server's `server_status` says `role: primary`.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct PromoteArgs {
    /// The server's pid file (its --pid-file).
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pid_file: Option<PathBuf>,

    /// The server's process id.
    #[arg(long)]
    pid: Option<i32>,

    /// Wait until the server at this ZEO address reports itself a primary.
    #[arg(short = 'a', long, value_name = "HOST:PORT")]
    address: Option<String>,

    /// The storage to check with --address.
    #[arg(long, default_value = "1")]
    storage: String,

    /// Seconds to wait with --address.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

pub fn run(args: PromoteArgs) -> Result<i32> {
    let pid = match (args.pid, &args.pid_file) {
        (Some(p), _) => p,
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no process id", f.display()))?,
        (None, None) => bail!("give the server's --pid or --pid-file"),
    };
    // SAFETY: sends a signal; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        bail!(
            "signalling process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let Some(address) = args.address else {
        println!("asked process {pid} to promote its replicas");
        return Ok(0);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
        loop {
            if let Some(role) = role(&address, &args.storage).await {
                if role == "primary" {
                    println!("{address}: primary");
                    return Ok(0);
                }
            }
            if Instant::now() > deadline {
                eprintln!(
                    "{address} did not become a primary within {}s",
                    args.timeout
                );
                return Ok(1);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The `role` a server reports in `server_status`, if it answers.
async fn role(address: &str, storage: &str) -> Option<String> {
    let opts = zeo_client::ConnectOptions {
        storage: storage.to_string(),
        read_only: true,
        ..Default::default()
    };
    let conn = zeo_client::Connection::connect(
        &zeo_client::Address(address.to_string()),
        &opts,
        std::sync::Arc::new(zeo_client::NoCallbacks),
    )
    .await
    .ok()?;
    let status = conn.call(&zeo_proto::Request::ServerStatus).await.ok();
    conn.close();
    status?.get("role")?.as_str().map(str::to_owned)
}
