//! Compiles the `.proto` contracts with protox (pure Rust), so building Courier needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/device.proto", "proto/cluster.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A receipt's copy goes into the message as the owner's buffer, shared rather than copied.
        .bytes(".courier.cluster.v1.UnsavedCopy.event_json")
        .compile_fds(descriptors)?;
    Ok(())
}
