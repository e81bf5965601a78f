//! Nothing is generated here. `protoc-bin-vendored` is this crate's build dependency so that
//! Cargo unpacks its `protoc` before any build script runs: etcd-client's build script then runs
//! it through `scripts/protoc` (`PROTOC` in `.cargo/config.toml`), and building podnet needs no
//! system protoc. This script only says early where that crate has no binary for the host.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = protoc_bin_vendored::protoc_bin_path() {
        println!(
            "cargo:warning=protoc-bin-vendored has no protoc for this host ({e}); \
             scripts/protoc falls back to protoc on PATH (Debian protobuf-compiler)"
        );
    }
}
