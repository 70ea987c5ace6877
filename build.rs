//! Compiles the protos with protox (pure Rust, so no protoc is needed on any machine), generates
//! the tonic code, and writes the descriptor set that server reflection serves.
//!
//! The code is generated twice: the messages and clients (`proto`), then the servers alone
//! (`proto::server`), with every message taken from `proto` except `WatchEventsResponse`, which
//! the server sends already encoded (an event is encoded once for all its subscribers), and
//! with the servers' own codec, whose response buffers start small (`rpc::Codec`).

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/hopper/delegation/v1/resources.proto",
    "proto/hopper/delegation/v1/instance_service.proto",
    "proto/hopper/delegation/v1/task_service.proto",
    "proto/hopper/delegation/v1/delegation_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // `compile_fds` does not write the descriptor set itself; reflection needs it.
    fs::write(
        out_dir.join("hopper_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors.clone())?;
    let servers = out_dir.join("server");
    fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(servers)
        .codec_path("crate::rpc::Codec")
        .extern_path(".hopper.delegation.v1", "crate::proto")
        .extern_path(
            ".hopper.delegation.v1.WatchEventsResponse",
            "crate::rpc::Encoded",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
