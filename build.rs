//! Compiles `proto/` with the pure-Rust `protox` compiler (no `protoc` needed)
//! and writes the encoded descriptor set that server reflection serves.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos: Vec<PathBuf> = std::fs::read_dir("proto/verdict/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    let fds = protox::compile(&protos, ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("verdict_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Stored JSON documents are sent as the bytes of their message,
        // written straight from the column (see `src/structs.rs`).
        .extern_path(".google.protobuf.Struct", "crate::structs::Struct")
        // Sessions, results and discrepancies are written straight from
        // their rows (see
        // `src/encode.rs`); clients read it as the generated message.
        .extern_path(
            ".verdict.v1.ListSessionsResponse",
            "crate::encode::ListSessionsResponse",
        )
        .extern_path(
            ".verdict.v1.ListResultsResponse",
            "crate::encode::ListResultsResponse",
        )
        .extern_path(
            ".verdict.v1.ListDiscrepanciesResponse",
            "crate::encode::ListDiscrepanciesResponse",
        )
        .extern_path(
            ".verdict.v1.ListSessionLogsResponse",
            "crate::encode::ListSessionLogsResponse",
        )
        .extern_path(
            ".verdict.v1.ListExecutionsResponse",
            "crate::encode::ListExecutionsResponse",
        )
        .extern_path(
            ".verdict.v1.GetSessionResponse",
            "crate::encode::GetSessionResponse",
        )
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
