//! Compiles Felix's dataplane-driver protocol (proto/felixbackend.proto) with the system's
//! protoc (Debian's protobuf-compiler, which etcd-client needs as well).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/felixbackend.proto");
    prost_build::Config::new().compile_protos(&["proto/felixbackend.proto"], &["proto"])
}
