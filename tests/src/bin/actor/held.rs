//! Actor subcommands for the hold tests that need more than one syscall:
//! a multi-threaded process held in one thread, and a held connect whose
//! destination a signal handler rewrites while the process is stopped.

use std::{
    fs::OpenOptions,
    net::{SocketAddr, SocketAddrV4},
    os::unix::fs::FileExt,
    sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How long the actor waits for its own threads before it gives up.
const THREAD_WAIT: Duration = Duration::from_secs(30);

/// Starts `workers` threads that count, each into its own u64 (little
/// endian) at offset 8 * i of `progress`, so the test can watch them from
/// outside while the process is stopped. Once every worker has counted, a
/// further thread connects to `addr`; when that returns, the actor waits
/// until every worker has counted again and prints the connect's errno.
pub fn threads_connect(workers: usize, progress: &str, addr: SocketAddr) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(progress)
        .expect("progress file");
    file.set_len(8 * workers as u64).expect("progress size");
    let counts: Vec<AtomicU64> = (0..workers).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for (i, count) in counts.iter().enumerate() {
            let (file, stop) = (&file, &stop);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    file.write_at(&n.to_le_bytes(), 8 * i as u64)
                        .expect("write progress");
                    count.store(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        // Every worker runs before the held action starts.
        wait_all_past(&counts, &vec![0; workers], "before the connect", &stop);
        let errno = s
            .spawn(|| super::connect_errno(addr))
            .join()
            .expect("connecting thread");
        // Every worker runs again after it.
        let after: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        wait_all_past(&counts, &after, "after the connect", &stop);
        stop.store(true, Ordering::Relaxed);
        println!("{errno}");
    });
}

/// Waits until every counter is past its mark; on timeout, stops the
/// workers and panics naming the ones that did not move.
fn wait_all_past(counts: &[AtomicU64], marks: &[u64], when: &str, stop: &AtomicBool) {
    let deadline = Instant::now() + THREAD_WAIT;
    loop {
        let now: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        if now.iter().zip(marks).all(|(n, m)| n > m) {
            return;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            panic!("workers did not run {when}: counts {now:?}, marks {marks:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `struct sockaddr_in` whose port and address a signal handler may
/// rewrite: atomics have the layout of the plain integers.
#[repr(C)]
struct SharedSockaddrIn {
    family: u16,
    /// Network byte order.
    port: AtomicU16,
    /// Network byte order.
    addr: AtomicU32,
    zero: [u8; 8],
}

const _: () = assert!(size_of::<SharedSockaddrIn>() == size_of::<libc::sockaddr_in>());

/// The buffer connect(2) reads, on its first attempt and on every restart.
static DEST: SharedSockaddrIn = SharedSockaddrIn {
    family: libc::AF_INET as u16,
    port: AtomicU16::new(0),
    addr: AtomicU32::new(0),
    zero: [0; 8],
};
/// What the SIGUSR1 handler writes into `DEST`.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
static NEXT_ADDR: AtomicU32 = AtomicU32::new(0);
/// How many times the handler ran.
static HANDLED: AtomicU32 = AtomicU32::new(0);

extern "C" fn rewrite_dest(_sig: libc::c_int) {
    // Atomic stores only: async-signal-safe.
    DEST.port
        .store(NEXT_PORT.load(Ordering::SeqCst), Ordering::SeqCst);
    DEST.addr
        .store(NEXT_ADDR.load(Ordering::SeqCst), Ordering::SeqCst);
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// One blocking IPv4 connect(2) to `a`, from the `DEST` buffer; SIGUSR1
/// rewrites that buffer to `b`. Prints how often the handler ran and the
/// connect's errno (0 = connected).
pub fn connect_rewritten(a: SocketAddrV4, b: SocketAddrV4) {
    DEST.port.store(a.port().to_be(), Ordering::SeqCst);
    DEST.addr
        .store(u32::from(*a.ip()).to_be(), Ordering::SeqCst);
    NEXT_PORT.store(b.port().to_be(), Ordering::SeqCst);
    NEXT_ADDR.store(u32::from(*b.ip()).to_be(), Ordering::SeqCst);
    // SAFETY: a zeroed sigaction is valid; the fields that matter are set
    // below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = rewrite_dest as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // No SA_RESTART: a held connect restarts anyway (-ERESTARTNOINTR).
    sa.sa_flags = 0;
    // SAFETY: sigemptyset and sigaction on valid, owned structs; the
    // handler only does atomic stores.
    unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()),
            0,
            "sigaction"
        );
    }
    // SAFETY: plain syscall; the fd is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: DEST has the layout of a sockaddr_in and lives forever.
    let ret = unsafe {
        libc::connect(
            fd,
            (&DEST as *const SharedSockaddrIn).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let errno = if ret == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    println!("handled:{} errno:{errno}", HANDLED.load(Ordering::SeqCst));
}

/// Becomes `program` through its open file (`execveat(fd, "", argv, envp,
/// AT_EMPTY_PATH)`, as `fexecve` does): the kernel's string for it is
/// `/dev/fd/N`. Returns only on failure, with the errno.
pub fn fexec(program: &str, rest: &[&str]) -> i32 {
    use std::{ffi::CString, os::fd::AsRawFd, os::unix::ffi::OsStrExt};
    let file = std::fs::File::open(program).expect("open the program");
    let cstr = |s: &[u8]| CString::new(s).expect("no NUL in an argument");
    let argv: Vec<CString> = std::iter::once(program)
        .chain(rest.iter().copied())
        .map(|a| cstr(a.as_bytes()))
        .collect();
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that
    // outlive the call; on success it does not return.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            file.as_raw_fd(),
            c"".as_ptr(),
            argv_p.as_ptr(),
            envp_p.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// Becomes `program` by the 32-bit `int $0x80` execve (which fires no
/// syscall tracepoint), after a 64-bit execve of a missing file with
/// other argv (which fails before any LSM hook). x86_64 only. Returns only
/// on failure, with the errno.
#[cfg(target_arch = "x86_64")]
pub fn exec32(program: &str, rest: &[&str]) -> i32 {
    use std::ffi::CString;
    let decoy = [c"decoy".as_ptr(), std::ptr::null()];
    // SAFETY: NUL-terminated strings and a NULL-terminated array; the call
    // fails (ENOENT).
    unsafe { libc::execv(c"/nonexistent-airlock-decoy".as_ptr(), decoy.as_ptr()) };
    // Strings and the pointer array below 4 GiB, where 32-bit pointers
    // reach.
    // SAFETY: a fresh anonymous mapping.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 16,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
    }
    let base = mem as usize;
    let mut at = base + 4096;
    let mut put = |bytes: &[u8]| -> u32 {
        let p = at;
        // SAFETY: inside the 64 KiB mapping (the test's words are short).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p as *mut u8, bytes.len()) };
        at += bytes.len();
        p as u32
    };
    let cstr = |s: &str| CString::new(s).expect("no NUL in an argument");
    let path = put(cstr(program).as_bytes_with_nul());
    let words: Vec<u32> = std::iter::once(program)
        .chain(rest.iter().copied())
        .map(|w| put(cstr(w).as_bytes_with_nul()))
        .collect();
    let argv = base as *mut u32;
    for (i, w) in words.iter().enumerate() {
        // SAFETY: the first 4 KiB of the mapping hold the pointer array.
        unsafe { argv.add(i).write(*w) };
    }
    // SAFETY: NULL terminator, inside the mapping.
    unsafe { argv.add(words.len()).write(0) };
    let envp = argv as usize + (words.len() + 1) * 4;
    // SAFETY: an empty environment.
    unsafe { (envp as *mut u32).write(0) };
    let ret: i32;
    // SAFETY: the 32-bit execve (11) with 32-bit pointers into the mapping;
    // on success it does not return.
    unsafe {
        // rbx is LLVM's: swapped in and out around the call.
        std::arch::asm!(
            "xchg rbx, {path:r}",
            "int 0x80",
            "xchg rbx, {path:r}",
            path = inout(reg) u64::from(path) => _,
            inlateout("eax") 11i32 => ret,
            in("ecx") argv as u32,
            in("edx") envp as u32,
        );
    }
    -ret
}

/// A TCP Fast Open connect: `sendto(MSG_FASTOPEN)` with data on a fresh
/// socket, which connects without connect(2). The errno (0: sent).
pub fn fast_open(addr: std::net::SocketAddr) -> i32 {
    // SAFETY: zeroed sockaddr structs are valid; filled below.
    let mut v4: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut v6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let (family, sa, len) = match addr {
        std::net::SocketAddr::V4(a) => {
            v4.sin_family = libc::AF_INET as libc::sa_family_t;
            v4.sin_port = a.port().to_be();
            v4.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            let p: *const libc::sockaddr = (&v4 as *const libc::sockaddr_in).cast();
            (libc::AF_INET, p, std::mem::size_of::<libc::sockaddr_in>())
        }
        std::net::SocketAddr::V6(a) => {
            v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            v6.sin6_port = a.port().to_be();
            v6.sin6_addr.s6_addr = a.ip().octets();
            let p: *const libc::sockaddr = (&v6 as *const libc::sockaddr_in6).cast();
            (libc::AF_INET6, p, std::mem::size_of::<libc::sockaddr_in6>())
        }
    };
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // an address that outlives them.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return errno();
        }
        let data = b"airlock-test";
        let rc = libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            sa,
            len as libc::socklen_t,
        );
        let e = if rc < 0 { errno() } else { 0 };
        libc::close(fd);
        e
    }
}

/// Runs `program` in a child made with pid `pid` (clone3 with `set_tid`,
/// which needs root), waits, and says how it ended as `run-timed` does
/// (without the time): `exit:N`, `signal:N`, `error:ERRNO` (exec failed),
/// or `busy` when `pid` is taken.
pub fn run_as_pid(pid: i32, program: &str, rest: &[&str]) -> String {
    use std::ffi::CString;
    let cstr = |s: &str| CString::new(s).expect("no NUL in an argument");
    let argv: Vec<CString> = std::iter::once(program)
        .chain(rest.iter().copied())
        .map(cstr)
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let tids = [pid];
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls, set_tid, set_tid_size.
    let args: [u64; 10] = [
        0,
        0,
        0,
        0,
        libc::SIGCHLD as u64,
        0,
        0,
        0,
        tids.as_ptr() as u64,
        1,
    ];
    // SAFETY: clone3 without a new stack behaves as fork; the child only
    // execs or exits.
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    if child == 0 {
        // SAFETY: NUL-terminated strings and a NULL-terminated array.
        unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        // SAFETY: leaving the child at once, reporting the errno.
        unsafe { libc::_exit(200 + errno.min(50)) };
    }
    if child < 0 {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        return if e == libc::EEXIST {
            "busy".into()
        } else {
            format!("clone3:{e}")
        };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child as i32, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        format!("signal:{}", libc::WTERMSIG(status))
    } else {
        match libc::WEXITSTATUS(status) {
            c @ 200..=250 => format!("error:{}", c - 200),
            c => format!("exit:{c}"),
        }
    }
}

/// One datagram from a fresh IPv4 UDP socket to `addr`, given with family
/// AF_UNSPEC. The errno (0: sent).
pub fn udp_send_unspec(addr: std::net::SocketAddrV4) -> i32 {
    // SAFETY: a zeroed sockaddr_in is valid; filled below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_UNSPEC as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return errno();
        }
        let data = b"airlock-test";
        let rc = libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let e = if rc < 0 { errno() } else { 0 };
        libc::close(fd);
        e
    }
}

/// Runs one io_uring operation and returns its completion's errno (0 for
/// success, a negative result negated; -1 if io_uring is not there).
fn uring_one(entry: io_uring::squeue::Entry) -> i32 {
    let Ok(mut ring) = io_uring::IoUring::new(4) else {
        return -1;
    };
    // SAFETY: the entry's buffers (built by the caller) outlive the wait
    // below, which returns only once the operation completed.
    if unsafe { ring.submission().push(&entry) }.is_err() {
        return -1;
    }
    if ring.submit_and_wait(1).is_err() {
        return -1;
    }
    match ring.completion().next() {
        Some(c) if c.result() < 0 => -c.result(),
        Some(_) => 0,
        None => -1,
    }
}

/// A TCP connect to `addr` by IORING_OP_CONNECT; the errno.
pub fn uring_connect(addr: std::net::SocketAddrV4) -> i32 {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket");
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let entry = io_uring::opcode::Connect::new(
        io_uring::types::Fd(fd),
        (&sa as *const libc::sockaddr_in).cast(),
        size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
    .build();
    uring_one(entry)
}

/// An open of `path` for reading by IORING_OP_OPENAT; the errno.
pub fn uring_open(path: &str) -> i32 {
    let c = std::ffi::CString::new(path).expect("a path without NUL");
    let entry = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(libc::O_RDONLY)
        .build();
    uring_one(entry)
}

/// `argv-race` (`in_env` false) and `env-race`: in each child, argv[3],
/// or the environment variable XYZ, is a 4-byte word (and a NUL) while a second thread writes "good" and "evil" into
/// them as fast as it can, so what the kernel copies at execve's entry and
/// what the new image receives can differ. Counts how each child ended.
pub fn argv_race(n: u32, program: &str, file: &str, in_env: bool) -> String {
    use std::{ffi::CString, sync::atomic::Ordering};
    let program = CString::new(program).expect("no NUL in PROGRAM");
    let file = CString::new(file).expect("no NUL in FILE");
    let (mut ran, mut refused, mut killed, mut other) = (0, 0, 0, 0);
    let good = u32::from_ne_bytes(*b"good");
    let evil = u32::from_ne_bytes(*b"evil");
    // "XYZ=", the word, and its NUL.
    static WORD: [std::sync::atomic::AtomicU32; 3] = [
        std::sync::atomic::AtomicU32::new(u32::from_ne_bytes(*b"XYZ=")),
        std::sync::atomic::AtomicU32::new(0),
        std::sync::atomic::AtomicU32::new(0),
    ];
    for _ in 0..n {
        WORD[1].store(good, Ordering::SeqCst);
        // SAFETY: fork from this single-threaded process; the child only
        // starts a thread and execs.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            static STARTED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            std::thread::spawn(move || {
                STARTED.store(true, Ordering::SeqCst);
                loop {
                    for w in [evil, good] {
                        WORD[1].store(w, Ordering::Relaxed);
                        for _ in 0..50 {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
            while !STARTED.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            let word = WORD[1].as_ptr().cast::<libc::c_char>().cast_const();
            let argv = if in_env {
                [
                    program.as_ptr(),
                    c"append-env".as_ptr(),
                    file.as_ptr(),
                    c"XYZ".as_ptr(),
                    std::ptr::null(),
                ]
            } else {
                [
                    program.as_ptr(),
                    c"append".as_ptr(),
                    file.as_ptr(),
                    word,
                    std::ptr::null(),
                ]
            };
            let env = [WORD.as_ptr().cast::<libc::c_char>(), std::ptr::null()];
            let envp: *const *const libc::c_char = if in_env {
                env.as_ptr()
            } else {
                // SAFETY: reads the process's environment pointer.
                unsafe { environ }
            };
            // SAFETY: NUL-terminated strings (WORD's last u32 is zero) in
            // NULL-terminated arrays; returns only on failure.
            unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            // SAFETY: leaves the child at once.
            unsafe { libc::_exit(if errno == libc::EPERM { 101 } else { 102 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just made.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            ran += 1;
        } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 101 {
            refused += 1;
        } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
            killed += 1;
        } else {
            other += 1;
        }
    }
    format!("ran:{ran} refused:{refused} killed:{killed} other:{other}")
}

unsafe extern "C" {
    /// The process's environment (libc's).
    static environ: *const *const libc::c_char;
}
