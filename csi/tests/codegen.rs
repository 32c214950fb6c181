//! The committed CSI bindings must match what the vendored proto generates.
//!
//! Generation uses protox (a pure-Rust protobuf compiler), so a fresh machine needs no
//! `protoc` and the build script stays empty; this test is the only generator.

use std::path::Path;

const FIX: &str = "run: UPDATE_GENERATED=1 cargo test -p hsm-secrets-csi --test codegen";
const HEADER: &str = "// Generated from proto/csi.proto by tests/codegen.rs; do not edit by hand.\n\
     // Regenerate: UPDATE_GENERATED=1 cargo test -p hsm-secrets-csi --test codegen\n";

fn generate() -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let descriptors = protox::compile(["csi.proto"], [crate_dir.join("proto")])
        .expect("proto/csi.proto should compile with protox");
    let out = tempfile::tempdir().expect("temp dir for generated code");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(true)
        .out_dir(out.path())
        .compile_fds(descriptors)
        .expect("tonic-prost-build should generate code from the descriptors");
    let generated =
        std::fs::read_to_string(out.path().join("csi.v1.rs")).expect("generated csi.v1.rs");
    format!("{HEADER}{generated}")
}

#[test]
fn committed_bindings_are_fresh() {
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/generated/csi.v1.rs");
    let fresh = generate();
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed_path, &fresh).expect("write src/generated/csi.v1.rs");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "src/generated/csi.v1.rs is stale or missing relative to proto/csi.proto; {FIX}"
    );
}
