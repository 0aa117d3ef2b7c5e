//! The reqwest-middleware adapter.
