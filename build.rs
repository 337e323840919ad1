//! Compiles the API contract with protox (no system `protoc`) and writes the descriptor sets that
//! server reflection serves: the contract's, and google.rpc's error details, which are not part
//! of the contract but are what every failure carries.
use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ccgw/callcontrol/v1/callcontrol.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("callcontrol_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Descriptors only: the Rust types are tonic-types' (the ones the status details are
    // encoded with).
    let error_details = protox::compile(["proto/google/rpc/error_details.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("error_details_descriptor.bin"),
        error_details.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::api::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
