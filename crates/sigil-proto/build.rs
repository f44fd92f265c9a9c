//! Compiles the protobuf files with protox (pure Rust), so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sigil/node/v1/node.proto",
        "proto/sigil/agent/v1/enforcer.proto",
        "proto/sigil/agent/v1/secrets.proto",
        "proto/spiffe/workload.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
