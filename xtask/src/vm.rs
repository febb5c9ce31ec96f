//! The VM test tier: Debian kernels with BPF LSM active, booted under QEMU
//! (TCG; KVM fails on these machines), with the real `airlock` binary, the
//! test actor and the compiled end-to-end tests in an initramfs.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::util::{output, run, workspace_root};

/// Kernel series tested, newest package of each from Debian's archive.
pub const KERNELS: &[&str] = &["6.12", "6.1"];

/// Tests too slow under TCG emulation or measured on the host instead
/// (storms and exec-rate thresholds).
const SKIP: &[&str] = &["storm", "tiny_ring", "a_thousand_execs"];

/// How long one VM may run before it is killed.
const VM_LIMIT: Duration = Duration::from_secs(900);

/// The outcome of one boot.
pub struct VmResult {
    pub kernel: String,
    pub passed: u64,
    pub failed: u64,
    pub ok: bool,
}

fn cache() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/airlock/vm")
}

/// Installs QEMU, busybox and cpio when missing.
pub fn tools() -> anyhow::Result<()> {
    crate::bootstrap::apt(&["qemu-system-x86", "busybox-static", "cpio"])
}

/// The newest cloud kernel package of a series, downloaded and unpacked once.
pub fn kernel(series: &str) -> anyhow::Result<PathBuf> {
    let pattern = format!(
        "^linux-image-{}\\.[0-9.+a-z-]*-cloud-amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let search = || -> anyhow::Result<Vec<String>> {
        let out = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect();
        names.sort_by_key(|a| version_key(a));
        Ok(names)
    };
    let mut names = search()?;
    if names.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        names = search()?;
    }
    let Some(name) = names.last() else {
        bail!(
            "no Debian package matches {pattern}: the VM tier needs a {series} cloud kernel from Debian's archive"
        );
    };
    let dir = cache().join(name);
    if let Some(vmlinuz) = find_vmlinuz(&dir) {
        return Ok(vmlinuz);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: downloading {name}");
    run(Command::new("apt-get")
        .arg("download")
        .arg(name)
        .current_dir(&dir))
    .with_context(|| format!("apt-get download {name}"))?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")))?;
    let _ = std::fs::remove_file(&deb);
    find_vmlinuz(&dir).with_context(|| format!("no boot/vmlinuz-* in {name}"))
}

/// "6.12.117+deb12" sorts by its numbers.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("root/boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// The compiled end-to-end test binaries (built if needed).
pub fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let out = output(
        Command::new(crate::util::cargo_bin())
            .args([
                "test",
                "-p",
                "airlock-tests",
                "--no-run",
                "--message-format=json",
            ])
            .current_dir(workspace_root()),
    )?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if is_test && let Some(exe) = v["executable"].as_str() {
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        bail!("cargo built no end-to-end test binary");
    }
    Ok(bins)
}

/// Builds the initramfs: busybox, bash, the binaries under test at their
/// host paths (the tests name them so), their shared libraries, and /init.
pub fn initramfs(airlock: &Path, actor: &Path, tests: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let root = cache().join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root", "tests", "etc",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))
        .context("busybox-static is missing")?;
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let mut libs = BTreeSet::new();
    let mut put = |src: &Path, dst: &Path| -> anyhow::Result<()> {
        let target = root.join(dst.strip_prefix("/").unwrap_or(dst));
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        // Debug info makes the test binaries ten times larger: strip it.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&target)
            .arg(src))
        .or_else(|_| {
            std::fs::copy(src, &target)
                .map(|_| ())
                .map_err(anyhow::Error::from)
        })?;
        libs.extend(shared_libs(src)?);
        Ok(())
    };
    put(airlock, Path::new("/bin/airlock"))?;
    put(actor, actor)?;
    put(Path::new("/usr/bin/bash"), Path::new("/bin/bash"))?;
    let mut names = Vec::new();
    for t in tests {
        let name = t
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("test")
            .to_string();
        put(t, &Path::new("/tests").join(&name))?;
        names.push(name);
    }
    for lib in &libs {
        let target = root.join(lib.strip_prefix("/").unwrap_or(lib));
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(lib, &target).with_context(|| format!("copying {}", lib.display()))?;
    }
    // The dynamic loader is looked up at /lib64 on x86-64.
    std::fs::create_dir_all(root.join("lib64"))?;
    let skip: Vec<String> = SKIP.iter().map(|s| format!("--skip {s}")).collect();
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/usr/bin:/sbin:/usr/sbin HOME=/root CI=true AIRLOCK_BIN=/bin/airlock RUST_BACKTRACE=0 AIRLOCK_EXPECT_LSM=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No tmpfs on /tmp: the binaries under test sit at their host paths, which
# may be under /tmp; the initramfs root is writable memory already.
mkdir -p /tmp && chmod 1777 /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
echo "AIRLOCK-VM: kernel $(uname -r)"
/bin/airlock status >/dev/null 2>&1
for t in {tests}; do
    /tests/$t --test-threads 1 {skip}
    echo "AIRLOCK-VM: $t rc=$?"
done
echo "AIRLOCK-VM: lsm $(cat /sys/kernel/security/lsm 2>/dev/null)"
echo "AIRLOCK-VM: dmesg follows"
dmesg | tail -40
echo "AIRLOCK-VM: done"
echo o > /proc/sysrq-trigger
sleep 10
"#,
        tests = names.join(" "),
        skip = skip.join(" ")
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init)?;
    run(Command::new("chmod").arg("755").arg(&init_path))?;
    let initrd = cache().join("initrd.gz");
    let sh = format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        root.display(),
        initrd.display()
    );
    run(Command::new("sh").arg("-c").arg(sh))?;
    Ok(initrd)
}

/// The shared libraries `ldd` lists for a binary (none for static ones).
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Boots one kernel with the initramfs and collects the results.
pub fn boot(kernel_series: &str, vmlinuz: &Path, initrd: &Path) -> anyhow::Result<VmResult> {
    eprintln!(
        "\n== VM: Linux {kernel_series} ({}) with BPF LSM",
        vmlinuz.display()
    );
    let log_path = cache().join(format!("console-{kernel_series}.log"));
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 lsm=lockdown,capability,landlock,yama,bpf",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let started = Instant::now();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut result = VmResult {
        kernel: kernel_series.to_string(),
        passed: 0,
        failed: 0,
        ok: true,
    };
    let mut saw_done = false;
    let mut runs = 0;
    loop {
        let left = VM_LIMIT.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if let Some(rest) = line.strip_prefix("AIRLOCK-VM: ") {
                    eprintln!("vm {kernel_series}: {rest}");
                    if let Some(k) = rest.strip_prefix("kernel ") {
                        result.kernel = k.to_string();
                    }
                    if let Some((_, rc)) = rest.split_once(" rc=") {
                        runs += 1;
                        if rc != "0" {
                            result.ok = false;
                        }
                    }
                    if rest == "done" {
                        saw_done = true;
                    }
                } else if let Some(r) = line.strip_prefix("test result: ") {
                    let num = |w: &str| {
                        r.split(';')
                            .find_map(|p| p.trim().strip_suffix(w))
                            .and_then(|n| n.rsplit(' ').next()?.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    result.passed += num(" passed");
                    result.failed += num(" failed");
                }
                console.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                console.push(format!("xtask: VM killed after {VM_LIMIT:?}"));
                result.ok = false;
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    std::fs::write(&log_path, console.join("\n"))?;
    if !saw_done || runs == 0 {
        result.ok = false;
    }
    eprintln!(
        "vm {kernel_series}: {} passed, {} failed in {:.0} s{}",
        result.passed,
        result.failed,
        started.elapsed().as_secs_f64(),
        if result.ok {
            String::new()
        } else {
            format!(
                " -- FAILED; console log (tests and kernel) at {}",
                log_path.display()
            )
        }
    );
    if !result.ok {
        for l in console
            .iter()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("  | {l}");
        }
    }
    Ok(result)
}

/// One VM run at a time on this machine: they share the initramfs, the
/// console logs and two CPUs. Held until the returned file is dropped.
pub fn lock() -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(cache())?;
    let path = cache().join("vm.lock");
    let file = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    if file.try_lock().is_err() {
        eprintln!(
            "another VM run holds {}: waiting for it to finish",
            path.display()
        );
        file.lock().with_context(|| path.display().to_string())?;
    }
    Ok(file)
}

/// The whole tier: tools, kernels, initramfs, one boot per kernel.
pub fn tier() -> anyhow::Result<Vec<VmResult>> {
    tools()?;
    let _lock = lock()?;
    crate::util::cargo(&["build", "-p", "airlock", "-p", "airlock-tests", "--bins"])?;
    let tests = test_binaries()?;
    let target = workspace_root().join("target/debug");
    let initrd = initramfs(&target.join("airlock"), &target.join("actor"), &tests)?;
    let mut results = Vec::new();
    for series in KERNELS {
        let vmlinuz = kernel(series)?;
        results.push(boot(series, &vmlinuz, &initrd)?);
    }
    Ok(results)
}
