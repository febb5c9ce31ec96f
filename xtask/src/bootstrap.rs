//! Installs what the build and the tests need, idempotently: the nightly
//! toolchain's rust-src, bpf-linker built against that toolchain's own LLVM,
//! and Debian packages on demand.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{cargo_bin, output, run};

/// rust-src for nightly and a bpf-linker matching nightly's LLVM.
pub fn toolchain() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

fn rustup(args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(args);
    c
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(&mut rustup(&["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (the eBPF crate needs it)");
        run(&mut rustup(&[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the nightly toolchain is missing and could not be installed")?;
    }
    let comps = output(&mut rustup(&[
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        run(&mut rustup(&[
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("rust-src for nightly is missing and could not be installed")?;
    }
    Ok(())
}

/// The LLVM inside the nightly toolchain: (major version, library path).
fn nightly_llvm() -> anyhow::Result<(String, PathBuf)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` names no LLVM version")?;
    let major = version.split('.').next().unwrap_or_default().to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain lacks its LLVM library",
                lib_dir.display()
            )
        })?;
    Ok((major, lib))
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/airlock")
}

/// bpf-linker must use the same LLVM as rustc's BPF codegen. It is built
/// from crates.io against the library shipped in the nightly toolchain,
/// through a prefix directory of symlinks (kept: the binary's rpath uses it).
fn bpf_linker() -> anyhow::Result<()> {
    let (major, lib) = nightly_llvm()?;
    let lib_name = lib
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let stamp_path = cache_dir().join("bpf-linker.stamp");
    let want = format!("llvm-{major} {lib_name}\n");
    let have = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && have == want {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker against nightly's LLVM {major} ({lib_name}); about two minutes, once"
    );
    let prefix = cache_dir().join("llvm").join(&lib_name);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", lib_name.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let features = format!("llvm-{major}");
    run(Command::new(cargo_bin())
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
            &features,
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("installing bpf-linker failed (it needs crates.io and a C toolchain)")?;
    std::fs::write(&stamp_path, want)
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

/// Installs Debian packages that are not installed yet.
pub fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::util::is_root() {
        bail!("Debian packages {missing:?} are missing and installing them needs root");
    }
    eprintln!("xtask: apt-get install {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

/// The programs the shipped-packs session runs (host and VM): git, make,
/// tar, curl and sudo, installed when missing.
pub fn workload_tools() -> anyhow::Result<Vec<std::path::PathBuf>> {
    const TOOLS: &[(&str, &str)] = &[
        ("git", "git"),
        ("make", "make"),
        ("tar", "tar"),
        ("curl", "curl"),
        ("sudo", "sudo"),
    ];
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(bin, _)| crate::util::which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt(&missing)?;
    }
    TOOLS
        .iter()
        .map(|(bin, _)| {
            crate::util::which(bin)
                .ok_or_else(|| anyhow::anyhow!("{bin} is still missing after apt-get install"))
        })
        .collect()
}
