//! Compiles `spool/v1/spool.proto` with protox (a pure-Rust protobuf compiler, so building
//! needs no system `protoc`) and generates prost messages and tonic stubs from it.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "spool/v1/spool.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("spool_descriptor.bin"), fds.encode_to_vec())?;
    // Messages and client stubs, with tonic-prost's codec.
    tonic_prost_build::configure()
        // Record data stays `bytes::Bytes` end to end: slices of the log, never copied.
        .bytes(".")
        .build_server(false)
        .compile_fds(fds.clone())?;
    // Server stubs only (the messages are the ones above), with the codec that calls a request
    // that does not decode the caller's error (`src/codec.rs`).
    let server = out.join("server");
    std::fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".spool.v1", "crate::v1")
        .codec_path("crate::codec::RequestCodec")
        .out_dir(&server)
        .compile_fds(fds)?;
    Ok(())
}
