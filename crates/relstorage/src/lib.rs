//! A ZODB storage on PostgreSQL, in RelStorage 4.x's own schema and with its locking
//! protocol, so that RelStorage clients, RelStorage's tools (`zodbconvert`, `zodbpack`)
//! and any number of zeors servers share one database.
//!
//! - [`schema`]: the tables, sequence, view, trigger and stored functions of both
//!   layouts (history-preserving and history-free), created when missing.
//! - `commit`: two-phase commit with RelStorage's advisory locks (objects in oid order,
//!   read-current shared locks, the commit lock -1 at finish).
//! - `watch`: learning of every commit (NOTIFY between zeors servers, polling for
//!   RelStorage clients) and announcing it, in tid order, to the server's sink.
//! - `cache`: recent object states in memory, kept correct by those announcements.
//! - `db`: the bounded connection pool and the mapping of database errors.
//! - [`PgStorage`]: the [`zodb::Storage`] implementation tying them together.

mod blobs;
mod cache;
mod commit;
mod db;
mod iter;
mod options;
mod pack;
pub mod schema;
mod storage;
mod undo;
mod watch;

pub use db::OpenError;
pub use options::Options;
pub use schema::Layout;
pub use storage::{PgStorage, LOAD_BEFORE_SQL};
