//! Integration tests of `spoold`: the real binary on 127.0.0.1 with an ephemeral port and a
//! temporary data directory, driven through the generated gRPC stubs.
// Tests reach files directly on purpose (damage them, read what the engine wrote).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod admin;
mod clock;
mod common;
mod consume;
mod durability;
mod errors;
mod groups;
mod grpcurl;
mod idle;
mod membership;
mod memory;
mod metrics;
mod open_files;
mod produce;
mod security;
mod startup;
