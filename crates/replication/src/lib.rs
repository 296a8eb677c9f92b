//! Replication with zc.zrs's protocol.
//!
//! A primary feeds replicas from its Data.fs; a replica keeps a Data.fs whose
//! transactions are the primary's (same tids, same records, back pointers and blobs
//! too), applying each durably before its own clients can see it, and serves ZEO clients
//! like any FileStorage server. zc.zrs primaries and secondaries interoperate with zeors
//! ones; between zeors peers the stream can be compressed and histories are checked for
//! divergence. A replica can itself feed replicas (chains), forward its clients' commits
//! to the primary, and be promoted to a primary.
//!
//! - [`codec`]: the wire protocol, sans I/O.
//! - [`node`]: the replicated storage the server serves (roles, applying, status).
//! - [`primary`]: feeding replicas; [`replica`]: following a primary.
//! - [`forward`]: a replica's clients' commits sent to the primary.
//! - [`fingerprint`]: comparing histories; [`compress`]: zstd between zeors peers.
//! - [`signal`], [`net`]: the last published transaction; link addresses.

pub mod codec;
pub mod compress;
pub mod fingerprint;
pub mod forward;
pub mod net;
pub mod node;
pub mod primary;
pub mod replica;
pub mod signal;

pub use forward::{ForwardConfig, Forwarder};
pub use node::{LinkState, Node, Role};
pub use replica::FollowConfig;

use std::time::Duration;

/// How long closing a node waits for its replicas to receive what is committed.
const DRAIN: Duration = Duration::from_secs(10);

/// Stops following, lets feeders send what is committed (for at most [`DRAIN`]) and
/// waits for the node's tasks. Called by [`Node`]'s `close`.
pub(crate) async fn shutdown(node: &Node) {
    node.stop_follow.send_replace(true);
    replica::wait_stopped(node).await;
    node.set_closing();
    let tasks: Vec<_> = std::mem::take(&mut *node.tasks.lock());
    let all = futures_join(tasks);
    if tokio::time::timeout(DRAIN, all).await.is_err() {
        tracing::warn!("replicas did not receive every transaction before the close");
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
