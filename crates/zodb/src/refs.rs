//! Persistent references inside record pickles (used by pack's garbage collection).
//! Filled in with the pack work; see `shared/protocol/filestorage.md` §7.
