//! The persistent cache (being written).
