//! Runnable examples of Spool live beside this file; see `cargo run --example embedded_log`.
