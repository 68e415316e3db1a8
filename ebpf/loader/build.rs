//! Compiles the kernel-side programs (`ebpf/programs/sluice.bpf.c`) with clang's BPF target into
//! `$OUT_DIR/sluice.bpf.o`, which the crate embeds; and exports the header's layout constants so
//! a test can compare them with the Rust types.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let programs = manifest.join("../programs");
    let src = programs.join("sluice.bpf.c");
    let header = programs.join("sluice.h");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-env-changed=SLUICE_CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("sluice.bpf.o");
    let clang = std::env::var("SLUICE_CLANG").unwrap_or_else(|_| "clang".into());
    // <asm/types.h> lives in the multiarch include directory on Debian/Ubuntu.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| std::env::consts::ARCH.into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I"])
        .arg(&multiarch)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            panic!("{clang} failed ({s}) compiling {}; run scripts/setup (needs clang, libbpf-dev)", src.display())
        }
        Err(e) => {
            panic!("cannot run {clang} ({e}): run scripts/setup (needs clang, libbpf-dev) to build the eBPF programs")
        }
    }
}
