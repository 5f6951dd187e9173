//! Compiles Felix's dataplane-driver protocol (proto/felixbackend.proto) with the system's
//! protoc (Debian's protobuf-compiler, which etcd-client needs as well), and the eBPF GRE
//! datapath (src/net/tunnel/ebpf/gre.bpf.c) with clang when it is there (Debian's `clang` and
//! `libbpf-dev`, installed by scripts/setup.sh). Without clang tenet still builds; its `ebpf`
//! tunnel backend then reports that it was built without the datapath (cfg `tenet_ebpf` unset).

use std::path::PathBuf;
use std::process::Command;

const BPF_SOURCE: &str = "src/net/tunnel/ebpf/gre.bpf.c";

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/felixbackend.proto");
    prost_build::Config::new().compile_protos(&["proto/felixbackend.proto"], &["proto"])?;
    build_bpf();
    Ok(())
}

fn build_bpf() {
    println!("cargo::rustc-check-cfg=cfg(tenet_ebpf)");
    println!("cargo:rerun-if-changed={BPF_SOURCE}");
    println!("cargo:rerun-if-env-changed=TENET_CLANG");
    let clang = std::env::var("TENET_CLANG").unwrap_or_else(|_| "clang".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("gre.bpf.o");
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    let result = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-c"])
        .arg(BPF_SOURCE)
        .arg("-I")
        .arg(&arch_include)
        .arg("-o")
        .arg(&out)
        .output();
    match result {
        Ok(o) if o.status.success() => println!("cargo::rustc-cfg=tenet_ebpf"),
        Ok(o) => panic!(
            "{clang} could not compile {BPF_SOURCE}:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!(
            "cargo::warning=no eBPF tunnel datapath: cannot run {clang} ({e}); \
             install clang and libbpf-dev (scripts/setup.sh does)"
        ),
    }
}
