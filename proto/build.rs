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
    tonic_prost_build::configure()
        // Record data stays `bytes::Bytes` end to end: slices of the log, never copied.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
