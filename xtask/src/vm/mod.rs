//! Debian kernels booted under QEMU (TCG; KVM fails on these machines)
//! with an initramfs of our own: the machinery the test tier (`tier`), the
//! demo and the VM bench share.

pub mod tier;

pub use tier::{KERNELS, tier};

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::util::{output, run, workspace_root};

fn cache() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/airlock/vm")
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(String::from)
        })
        .unwrap_or_else(|| "qemu-system-x86_64: version unknown".into())
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

/// What goes into one initramfs: the files to copy in and the shell script
/// that /init runs after the common set-up (mounts, loopback, PATH). /init
/// prints `AIRLOCK-VM: kernel ...` before the script and `AIRLOCK-VM: done`
/// after it, then powers the VM off.
pub struct Image {
    /// Names the image's directory and console logs under target/vm.
    pub name: &'static str,
    /// (file on the host, path in the VM); ELF files are stripped of debug
    /// info and bring the shared libraries `ldd` lists.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Text files to write into the VM: (path in the VM, contents, mode).
    pub texts: Vec<(PathBuf, String, u32)>,
    /// Busybox sh, run by /init.
    pub script: String,
}

/// Where images and console logs of this checkout go: under its own target
/// directory, so checkouts sharing the kernel cache do not overwrite each
/// other's images.
pub fn work_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// Builds the initramfs of `image`: busybox, bash, the image's files and
/// their shared libraries, and /init. Returns the gzipped cpio archive.
pub fn initramfs(image: &Image) -> anyhow::Result<PathBuf> {
    let root = work_dir().join(image.name);
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root", "etc", "run",
        "var/lib", "var/log",
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
    let in_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut libs = BTreeSet::new();
    let bash = (PathBuf::from("/usr/bin/bash"), PathBuf::from("/bin/bash"));
    for (src, dst) in image.files.iter().chain([&bash]) {
        let target = in_root(dst);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        // Debug info makes the test binaries ten times larger: strip it.
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&target)
            .arg(src)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(src, &target)
                .with_context(|| format!("copying {} into the VM image", src.display()))?;
        }
        libs.extend(shared_libs(src)?);
    }
    for lib in &libs {
        let target = in_root(lib);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(lib, &target).with_context(|| format!("copying {}", lib.display()))?;
    }
    // The dynamic loader is looked up at /lib64 on x86-64.
    std::fs::create_dir_all(root.join("lib64"))?;
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No tmpfs on /tmp: the binaries under test may sit at their host paths,
# which may be under /tmp; the initramfs root is writable memory already.
mkdir -p /tmp && chmod 1777 /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
echo "AIRLOCK-VM: kernel $(uname -r)"
{script}
echo "AIRLOCK-VM: done"
echo o > /proc/sysrq-trigger
sleep 10
"#,
        script = image.script
    );
    let texts = image
        .texts
        .iter()
        .map(|(p, t, m)| (p.clone(), t.clone(), *m))
        .chain([(PathBuf::from("/init"), init, 0o755)]);
    for (path, text, mode) in texts {
        use std::os::unix::fs::PermissionsExt;
        let target = in_root(&path);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&target, text)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    }
    let initrd = work_dir().join(format!("{}.initrd.gz", image.name));
    let sh = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        initrd.display()
    );
    run(Command::new("sh").arg("-c").arg(sh)).context("packing the initramfs")?;
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

/// What one boot printed.
pub struct Console {
    /// Every console line, in order.
    pub lines: Vec<String>,
    /// /init reached its end (`AIRLOCK-VM: done`) before the time limit.
    pub finished: bool,
    pub elapsed: Duration,
    /// The whole console, written to a file.
    pub log: PathBuf,
}

impl Console {
    /// Prints the last `n` lines, indented, on stderr.
    pub fn print_tail(&self, n: usize) {
        let skip = self.lines.len().saturating_sub(n);
        for l in &self.lines[skip..] {
            eprintln!("  | {l}");
        }
    }
}

/// How QEMU runs the guest.
#[derive(Clone, Copy)]
pub struct Machine {
    pub cpus: u32,
    /// Guest time from the instruction count while a vCPU runs, 2^N ns per
    /// instruction (`-icount shift=N,sleep=on`: idle time still follows the
    /// host's clock; one host thread for all vCPUs): CPU-bound guest timings
    /// then do not depend on host load.
    pub icount_shift: Option<u32>,
}

impl Default for Machine {
    fn default() -> Self {
        Self {
            cpus: 2,
            icount_shift: None,
        }
    }
}

/// What the guest kernel is told on its command line.
#[derive(Clone, Debug)]
pub struct Guest {
    /// `bpf` in the active LSM list.
    pub bpf_lsm: bool,
    /// Unpack the initramfs before the initcalls run, not beside them
    /// (`initramfs_async=0`): the asynchronous unpacking beside initcalls
    /// that patch kernel text is when multi-threaded TCG crashed at boot.
    pub sync_initramfs: bool,
    /// `NAME=value` words without a dot: the kernel hands them to /init as
    /// environment variables.
    pub env: Vec<(String, String)>,
    /// Names the console log (`{image}-console-{log_name}.log`).
    pub log_name: String,
}

impl Guest {
    /// BPF LSM active, nothing else: what the demo and the bench boot.
    pub fn with_bpf_lsm(series: &str) -> Self {
        Self {
            bpf_lsm: true,
            sync_initramfs: false,
            env: Vec::new(),
            log_name: series.to_string(),
        }
    }

    fn cmdline(&self) -> String {
        // oops=panic and panic=-1 (with QEMU's -no-reboot): a guest kernel
        // that crashes ends the VM at once instead of running on broken.
        let mut c = String::from(
            "console=ttyS0 quiet panic=-1 oops=panic lsm=lockdown,capability,landlock,yama",
        );
        if self.bpf_lsm {
            c.push_str(",bpf");
        }
        if self.sync_initramfs {
            c.push_str(" initramfs_async=0");
        }
        for (k, v) in &self.env {
            c.push_str(&format!(" {k}={v}"));
        }
        c
    }
}

/// Boots one kernel with an initramfs under QEMU (TCG), with the guest's
/// command line from `guest`, handing each console line to `on_line` as it
/// arrives. Kills the VM after `limit`.
pub fn boot_guest(
    image: &str,
    guest: &Guest,
    vmlinuz: &Path,
    initrd: &Path,
    machine: Machine,
    limit: Duration,
    on_line: &mut dyn FnMut(&str),
) -> anyhow::Result<Console> {
    let log = work_dir().join(format!("{image}-console-{}.log", guest.log_name));
    let mut qemu = Command::new("qemu-system-x86_64");
    match machine.icount_shift {
        // icount needs single-threaded TCG.
        Some(n) => qemu.args([
            "-accel".to_string(),
            "tcg,thread=single".into(),
            "-icount".into(),
            format!("shift={n},sleep=on"),
        ]),
        None => qemu.args(["-accel", "tcg"]),
    };
    let mut child = qemu
        .args(["-cpu", "max", "-m", "2048", "-nographic", "-no-reboot"])
        .arg("-smp")
        .arg(machine.cpus.to_string())
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(guest.cmdline())
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
    let mut lines = Vec::new();
    let mut finished = false;
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = plain(&line);
                if line == "AIRLOCK-VM: done" {
                    finished = true;
                }
                on_line(&line);
                lines.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                lines.push(format!("xtask: VM killed after {limit:?}"));
                finished = false;
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    std::fs::write(&log, lines.join("\n")).with_context(|| format!("writing {}", log.display()))?;
    Ok(Console {
        lines,
        finished,
        elapsed: started.elapsed(),
        log,
    })
}

/// A console line without the terminal control sequences the firmware and
/// the console driver print (reset, clear screen, colours) and carriage returns.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; otherwise ESC and one char.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.trim_end().to_string()
}

/// One VM at a time on this machine: two CPUs under emulation leave no
/// room for a second, and a benchmark's timings need them alone. Held until
/// the returned file is dropped.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_terminal_control() {
        assert_eq!(
            plain("\x1bc\x1b[?7l\x1b[2JAIRLOCK-VM: kernel 6.12\r"),
            "AIRLOCK-VM: kernel 6.12"
        );
        assert_eq!(plain("State:\tT (stopped)"), "State:\tT (stopped)");
    }
}
