//! Spool's gRPC contract (`spool.v1`), generated from `proto/spool/v1/spool.proto`.
//!
//! No logic lives here: the broker implements the `*_server` traits, clients use the
//! `*_client` stubs. [`FILE_DESCRIPTOR_SET`] feeds server reflection so `grpcurl` needs no
//! .proto files.

/// Messages and services of `spool.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("spool.v1");
}

/// The encoded `FileDescriptorSet` of `spool.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/spool_descriptor.bin"));
