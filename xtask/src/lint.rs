//! cargo fmt --check and clippy with warnings denied; the eBPF crate is
//! linted on its own, for its own target.

use crate::util::cargo;

pub fn run() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "airlock-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    crate::util::run(&mut crate::util::nightly_cargo(&[
        "clippy",
        "-p",
        "airlock-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}
