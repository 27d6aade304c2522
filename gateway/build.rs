//! Embeds the eBPF object so one gatewayd binary deploys.
//!
//! The object is built by `cargo xtask build-ebpf` (nightly, bpf-linker) rather than from here:
//! a build script cannot switch toolchains cleanly, and the user-space build must stay on
//! stable. Without the object the build stops and says what to run.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=GATEWAY_EBPF_OBJECT");
    let object = match std::env::var_os("GATEWAY_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/gateway-ebpf.o"),
    };
    println!("cargo::rerun-if-changed={}", object.display());
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        eprintln!("OUT_DIR is not set; this must run under cargo");
        std::process::exit(1);
    };
    let dest = PathBuf::from(out_dir).join("gateway-ebpf.o");
    if let Err(e) = std::fs::copy(&object, &dest) {
        eprintln!(
            "\nerror: the eBPF object {} is missing or unreadable ({e}).\n\
             Run `cargo xtask build-ebpf` first (it builds gateway-ebpf with the nightly \
             toolchain and bpf-linker; `cargo xtask setup` installs them).\n",
            object.display()
        );
        std::process::exit(1);
    }
}
