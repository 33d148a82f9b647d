//! Spool's gRPC contract (`spool.v1`), generated from `proto/spool/v1/spool.proto`.
//!
//! No logic lives here: the broker implements the `*_server` traits, clients use the
//! `*_client` stubs. [`FILE_DESCRIPTOR_SET`] feeds server reflection so `grpcurl` needs no
//! .proto files. The one exception is the server stubs' codec ([`codec`]): it counts the
//! elements of a request's repeated fields on the wire before decoding (against the limits
//! the broker installs), and reports a request that does not decode as INVALID_ARGUMENT
//! rather than tonic-prost's INTERNAL.

pub mod codec;

/// Messages and services of `spool.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("spool.v1");
    include!(concat!(env!("OUT_DIR"), "/server/spool.v1.rs"));
}

/// The encoded `FileDescriptorSet` of `spool.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/spool_descriptor.bin"));
