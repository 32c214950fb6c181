//! The committed agent bindings must match what `proto/agent.proto` generates.
//!
//! Generation uses protox (a pure-Rust protobuf compiler), so a fresh machine needs no
//! `protoc` and there is no build script; this test is the only generator.

use std::path::Path;

const FIX: &str = "run: UPDATE_GENERATED=1 cargo test -p hsm-secrets --test install codegen::";
const HEADER: &str = "// Generated from proto/agent.proto by tests/install/codegen.rs; do not edit by hand.\n\
     // Regenerate: UPDATE_GENERATED=1 cargo test -p hsm-secrets --test install codegen::\n";
const GENERATED: &str = "src/mirror/rpc/generated/hsmsecrets.agent.v1.rs";

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let descriptors = protox::compile(["agent.proto"], [root.join("proto")])
        .expect("proto/agent.proto should compile with protox");
    let out = tempfile::tempdir().expect("temp dir for generated code");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(true)
        .out_dir(out.path())
        .compile_fds(descriptors)
        .expect("tonic-prost-build should generate code from the descriptors");
    let generated = std::fs::read_to_string(out.path().join("hsmsecrets.agent.v1.rs"))
        .expect("generated hsmsecrets.agent.v1.rs");
    format!("{HEADER}{generated}")
}

#[test]
fn committed_agent_bindings_are_fresh() {
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GENERATED);
    let fresh = generate();
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed_path, &fresh).expect("write the generated bindings");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{GENERATED} is stale or missing relative to proto/agent.proto; {FIX}"
    );
}
