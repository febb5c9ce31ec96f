//! Small helpers: running commands with clear failures.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(".."))
}

pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs cargo in the workspace root; fails on a non-zero exit.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(cargo_bin())
        .args(args)
        .current_dir(workspace_root()))
}

/// Runs a command with inherited stdio; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// cargo on the nightly toolchain (for the eBPF crate), without the stable
/// toolchain's variables that `cargo xtask` inherited.
pub fn nightly_cargo(args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(workspace_root());
    for v in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
    ] {
        c.env_remove(v);
    }
    c
}

/// Builds the `airlock` and `actor` binaries (release or debug) and returns
/// their paths.
pub fn build_binaries(release: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    args.extend(["-p", "airlock", "-p", "airlock-tests", "--bins"]);
    cargo(&args)?;
    let target = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok((target.join("airlock"), target.join("actor")))
}

/// The path of `program` on PATH, if it is there.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
