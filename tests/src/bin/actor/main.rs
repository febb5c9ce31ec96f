//! A small, fast test actor: does one kind of action on request, so the
//! end-to-end tests know exactly what the kernel should have seen.
//!
//! actor connect ADDR:PORT          blocking TCP connect, print the errno (0 = ok)
//! actor connect-nonblocking ADDR:PORT  the same through a non-blocking connect
//! actor udp ADDR:PORT COUNT        send COUNT datagrams to one destination
//! actor accept PORT                accept one TCP connection on [::] (v4 and v6), print the peer
//! actor spawn N PROGRAM            spawn+wait PROGRAM N times, print N
//! actor storm SECONDS THREADS PROGRAM  spawn PROGRAM for SECONDS on THREADS threads, print how many
//! actor time-spawn N PROGRAM       spawn+wait PROGRAM N times, print the elapsed ns
//! actor spawn-each N PROGRAM      spawn+wait PROGRAM N times, print each one's elapsed ns
//! actor time-connect N             connect+close to its own loopback listener N times, print the elapsed ns
//! actor udp-connects N             connect one UDP socket to N destinations (no packets), print the elapsed ns
//! actor run-timed PROGRAM [ARGS]   spawn+wait once, print "<ms> exit:<code>", "<ms> signal:<n>" or "<ms> error:<errno>"
//! actor connect-timed ADDR:PORT [MS]  blocking TCP connect, print "<ms> <errno>", then stay MS ms
//! actor now                        print the wall-clock time in ns (a resumed program's first act)
//! actor seq N PROGRAM [ARGS]       run PROGRAM N times, one after the other
//! actor connect-stamps N ADDR:PORT connect N times, printing the wall-clock ns as each returns
//! actor parallel N PROGRAM         spawn N at once (from N threads), wait for all, print "exit:<k> signal:<m> refused:<r>"
//! actor threads-connect N FILE ADDR:PORT  N worker threads count into FILE (u64 LE each) while
//!                                  another thread connects; print the errno once every worker moved on after it
//! actor open PATH [write|create]   open PATH for reading (or, with write, for writing without
//!                                  creating or truncating; with create, creating it if need be);
//!                                  print the errno (0 = ok), and after
//!                                  a read's 0 what it read (first line)
//! actor connect-blocked N MS      N threads each make a blocking IPv4 connect to a loopback listener
//!                                  whose accept queue is full (so each waits in the kernel until its
//!                                  MS send timeout); print "connects:<all connect calls made>"
//! actor as-user UID GID PROGRAM [ARGS]  drop to UID/GID (no supplementary groups), then exec PROGRAM
//! actor fexec PROGRAM [ARGS]       open PROGRAM and become it by execveat(fd, "", AT_EMPTY_PATH)
//!                                  (what fexecve does: the kernel sees /dev/fd/N); if that
//!                                  fails print "error:<errno>" and exit 126
//! actor exec32 PROGRAM [ARGS]      fail a 64-bit execve with other argv, then become PROGRAM by the
//!                                  32-bit `int $0x80` execve (x86_64); if that fails print
//!                                  "error:<errno>" and exit 126
//! actor udp-send ADDR:PORT        one datagram by sendto on an unconnected socket; print the errno
//! actor udp-send-unspec A.B.C.D:PORT  as udp-send, the address given with family AF_UNSPEC
//!                                  (which udp_sendmsg takes as AF_INET)
//! actor udp-gated ADDR:PORT GATE  a datagram by sendto, then (the same socket, the same process)
//!                                  another once the file GATE exists; print each errno
//! actor tfo ADDR:PORT              a TCP Fast Open connect (sendto with MSG_FASTOPEN and data on a
//!                                  fresh socket); print the errno
//! actor run-as-pid PID PROGRAM [ARGS]  as run-timed, the child made with pid PID (clone3 set_tid,
//!                                  root); "busy" if PID is taken
//! actor argv0 NAME PROGRAM [ARGS]  become PROGRAM with argv[0] = NAME (`exec -a`); if that fails
//!                                  print "error:<errno>" and exit 126
//! actor rename|link|symlink FROM TO  rename(2), link(2) or symlink(2); print the errno
//! actor unlink|rmdir PATH        unlink(2) or rmdir(2); print the errno
//! actor gated-spawns GATE N PROGRAM [ARGS]  make GATE.ready, then N times: wait for GATE.<i>,
//!                                  spawn+wait PROGRAM, print "exit:<code>" or "error:<errno>"
//! actor uring-connect A.B.C.D:PORT  TCP connect through io_uring (IORING_OP_CONNECT); print the errno
//! actor uring-open PATH           open PATH for reading through io_uring (IORING_OP_OPENAT); print the errno
//! actor truncate PATH            truncate(2) PATH to 0 bytes (no open); print the errno
//! actor unix-connect PATH        stream connect to the Unix socket PATH (`@NAME`: abstract); print the errno
//! actor unix-send PATH           one datagram by sendto from an unbound Unix datagram socket to PATH; print the errno
//! actor unix-self PATH           listen on the Unix socket PATH itself, connect to it; print the errno
//! actor connect-rewritten A:PORT B:PORT [then-a]  IPv4 connect to A; a SIGUSR1 handler rewrites the
//!                                  sockaddr buffer to B; print "handled:<n> errno:<e>"; with then-a,
//!                                  connect to A once more and print "again:<errno>"
//! actor append FILE WORDS...      append the words (one line) to FILE
//! actor argv-race N PROGRAM FILE  N times: a child whose second thread flips a word between
//!                                  "good" and "evil" while the first execs `PROGRAM append FILE
//!                                  <word>`; print "ran:<a> refused:<b> killed:<c> other:<d>"
//! actor env-race N PROGRAM FILE   as argv-race, the word the value of XYZ, the only variable of
//!                                  `PROGRAM append-env FILE XYZ`'s environment
//! actor append-env FILE NAME      append the value of the variable NAME (one line) to FILE

mod held;

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, ExitCode},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["as-user", uid, gid, program, rest @ ..] => {
            use std::os::unix::process::CommandExt;
            let uid: u32 = uid.parse().expect("UID");
            let gid: u32 = gid.parse().expect("GID");
            // SAFETY: plain syscalls with integer arguments; on failure the
            // actor stops before running anything as the wrong user.
            unsafe {
                assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
                assert_eq!(libc::setgid(gid), 0, "setgid");
                assert_eq!(libc::setuid(uid), 0, "setuid");
            }
            let e = Command::new(program).args(rest).exec();
            panic!("exec {program}: {e}");
        }
        ["connect", addr] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let errno = connect_errno(addr);
            println!("{errno}");
        }
        ["connect-nonblocking", addr] => {
            // std's connect_timeout: a non-blocking connect(2) (EINPROGRESS), then poll.
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let errno = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            println!("{errno}");
        }
        ["udp", addr, count] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind).expect("bind");
            for _ in 0..count.parse::<u32>().expect("COUNT") {
                sock.send_to(b"airlock-test", addr).expect("send_to");
            }
        }
        ["udp-send", addr] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind).expect("bind");
            let errno = match sock.send_to(b"airlock-test", addr) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            println!("{errno}");
        }
        ["unix-connect", path] => {
            let r = match unix_addr(path) {
                Ok(a) => std::os::unix::net::UnixStream::connect_addr(&a).map(drop),
                Err(e) => Err(e),
            };
            println!("{}", errno_of(r));
        }
        ["unix-send", path] => {
            let r = std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.send_to_addr(b"airlock-test", &unix_addr(path)?))
                .map(drop);
            println!("{}", errno_of(r));
        }
        ["unix-self", path] => {
            let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
            let r = std::os::unix::net::UnixStream::connect(path).map(drop);
            drop(listener);
            println!("{}", errno_of(r));
        }
        ["udp-send-unspec", addr] => {
            let addr: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            println!("{}", held::udp_send_unspec(addr));
        }
        ["udp-gated", addr, gate] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let send = || match sock.send_to(b"airlock-test", addr) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            println!("{}", send());
            while !std::path::Path::new(gate).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("{}", send());
        }
        ["tfo", addr] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            println!("{}", held::fast_open(addr));
        }
        ["connect-blocked", n, ms] => {
            let n: usize = n.parse().expect("N");
            let ms: i64 = ms.parse().expect("MS");
            println!("connects:{}", connect_blocked(n, ms));
        }
        ["accept", port] => {
            let listener = TcpListener::bind(format!("[::]:{port}")).expect("bind");
            println!("listening");
            std::io::stdout().flush().ok();
            let (_s, peer) = listener.accept().expect("accept");
            println!("{peer}");
        }
        ["spawn", n, program] => {
            let n: u64 = n.parse().expect("N");
            for _ in 0..n {
                Command::new(program).status().expect("spawn");
            }
            println!("{n}");
        }
        ["storm", secs, threads, program] => {
            let until = Instant::now() + Duration::from_secs(secs.parse().expect("SECONDS"));
            let done = AtomicU64::new(0);
            std::thread::scope(|s| {
                for _ in 0..threads.parse::<u32>().expect("THREADS") {
                    s.spawn(|| {
                        while Instant::now() < until {
                            if Command::new(program).status().is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            println!("{}", done.load(Ordering::Relaxed));
        }
        ["time-spawn", n, program] => {
            let start = Instant::now();
            for _ in 0..n.parse::<u64>().expect("N") {
                Command::new(program).status().expect("spawn");
            }
            println!("{}", start.elapsed().as_nanos());
        }
        ["spawn-each", n, program] => {
            let mut times = Vec::new();
            for _ in 0..n.parse::<u64>().expect("N") {
                let start = Instant::now();
                Command::new(program).status().expect("spawn");
                times.push(start.elapsed().as_nanos().to_string());
            }
            println!("{}", times.join(" "));
        }
        ["time-connect", n] => {
            use std::os::fd::AsRawFd;
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            // A deep accept queue: std's 128 overflowed under a fast loop
            // (each overflow costs a SYN retransmit, about a second).
            // SAFETY: listen(2) again on our own socket, a larger backlog.
            assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0);
            let addr = listener.local_addr().expect("addr");
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    drop(s);
                }
            });
            let start = Instant::now();
            for _ in 0..n.parse::<u64>().expect("N") {
                let s = TcpStream::connect(addr).expect("connect");
                reset_on_close(&s);
            }
            println!("{}", start.elapsed().as_nanos());
        }
        ["udp-connects", n] => {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let start = Instant::now();
            for i in 0..n.parse::<u32>().expect("N") {
                let port = 1 + (i % 65000) as u16;
                sock.connect(("127.0.0.1", port)).expect("udp connect");
            }
            println!("{}", start.elapsed().as_nanos());
        }
        ["run-timed", program, rest @ ..] => {
            let start = Instant::now();
            let st = match Command::new(program).args(rest).status() {
                Ok(st) => st,
                Err(e) => {
                    // execve itself failed (EPERM from a BPF LSM deny).
                    let errno = e.raw_os_error().unwrap_or(-1);
                    println!("{} error:{errno}", start.elapsed().as_millis());
                    return ExitCode::SUCCESS;
                }
            };
            let ms = start.elapsed().as_millis();
            match (
                st.code(),
                std::os::unix::process::ExitStatusExt::signal(&st),
            ) {
                (Some(c), _) => println!("{ms} exit:{c}"),
                (None, Some(sig)) => println!("{ms} signal:{sig}"),
                _ => println!("{ms} unknown"),
            }
        }
        ["connect-timed", addr, linger @ ..] if linger.len() <= 1 => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            let start = Instant::now();
            let errno = connect_errno(addr);
            println!("{} {errno}", start.elapsed().as_millis());
            if let [ms] = linger {
                // Outlive the (held) connect by `ms`.
                std::thread::sleep(Duration::from_millis(ms.parse().expect("MS")));
            }
        }
        ["now"] => println!("{}", wall_ns()),
        ["seq", n, program, rest @ ..] => {
            for _ in 0..n.parse::<u32>().expect("N") {
                Command::new(program).args(rest).status().expect("spawn");
            }
        }
        ["connect-stamps", n, addr] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            for _ in 0..n.parse::<u32>().expect("N") {
                let errno = connect_errno(addr);
                println!("{} {errno}", wall_ns());
            }
        }
        ["parallel", n, program] => {
            // One thread per child: with vfork-style spawning a parent waits
            // while its child's execve is held.
            let spawned: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..n.parse::<u32>().expect("N"))
                    .map(|_| s.spawn(|| Command::new(program).spawn()))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("spawner"))
                    .collect()
            });
            let (mut exited, mut signalled, mut refused) = (0, 0, 0);
            let mut children = Vec::new();
            for c in spawned {
                match c {
                    Ok(c) => children.push(c),
                    // execve refused (EPERM from a BPF LSM deny).
                    Err(_) => refused += 1,
                }
            }
            for mut c in children {
                let st = c.wait().expect("wait");
                if st.code().is_some() {
                    exited += 1;
                } else {
                    signalled += 1;
                }
            }
            println!("exit:{exited} signal:{signalled} refused:{refused}");
        }
        ["open", path, rest @ ..] if matches!(rest, [] | ["write"] | ["create"]) => {
            let create = rest == ["create"];
            let write = rest == ["write"] || create;
            let opened = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .create(create)
                .truncate(false)
                .open(path);
            match opened {
                Ok(_) if write => println!("0"),
                Ok(mut f) => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut f, &mut text).expect("read");
                    println!("0 {}", text.lines().next().unwrap_or(""));
                }
                Err(e) => println!("{}", e.raw_os_error().unwrap_or(-1)),
            }
        }
        ["gated-spawns", gate, n, program, rest @ ..] => {
            std::fs::write(format!("{gate}.ready"), "").expect("ready file");
            for i in 1..=n.parse::<u32>().expect("N") {
                let next = format!("{gate}.{i}");
                while !std::path::Path::new(&next).exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                match Command::new(program).args(rest).status() {
                    Ok(st) => println!("exit:{}", st.code().unwrap_or(-1)),
                    Err(e) => println!("error:{}", e.raw_os_error().unwrap_or(-1)),
                }
                let _ = std::io::stdout().flush();
            }
        }
        ["uring-connect", addr] => {
            let addr: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            println!("{}", held::uring_connect(addr));
        }
        ["uring-open", path] => {
            println!("{}", held::uring_open(path));
        }
        [op @ ("rename" | "link" | "symlink"), from, to] => {
            let r = match *op {
                "rename" => std::fs::rename(from, to),
                "link" => std::fs::hard_link(from, to),
                _ => std::os::unix::fs::symlink(from, to),
            };
            println!("{}", errno_of(r));
        }
        ["unlink", path] => println!("{}", errno_of(std::fs::remove_file(path))),
        ["rmdir", path] => println!("{}", errno_of(std::fs::remove_dir(path))),
        ["append", file, words @ ..] => {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .expect("FILE");
            writeln!(f, "{}", words.join(" ")).expect("append");
        }
        [race @ ("argv-race" | "env-race"), n, program, file] => {
            let n: u32 = n.parse().expect("N");
            println!("{}", held::argv_race(n, program, file, *race == "env-race"));
        }
        ["append-env", file, name] => {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .expect("FILE");
            writeln!(f, "{}", std::env::var(name).unwrap_or_default()).expect("append");
        }
        ["truncate", path] => {
            let c = std::ffi::CString::new(*path).expect("a path without NUL");
            // SAFETY: truncate(2) with a NUL-terminated path.
            let r = unsafe { libc::truncate(c.as_ptr(), 0) };
            let errno = if r == 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            };
            println!("{errno}");
        }
        ["threads-connect", n, file, addr] => {
            let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
            held::threads_connect(n.parse().expect("N"), file, addr);
        }
        #[cfg(target_arch = "x86_64")]
        ["exec32", program, rest @ ..] => {
            let errno = held::exec32(program, rest);
            println!("error:{errno}");
            return ExitCode::from(126);
        }
        ["run-as-pid", pid, program, rest @ ..] => {
            let pid: i32 = pid.parse().expect("PID");
            println!("{}", held::run_as_pid(pid, program, rest));
        }
        ["argv0", name, program, rest @ ..] => {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(program)
                .arg0(name)
                .args(rest)
                .exec();
            println!("error:{}", e.raw_os_error().unwrap_or(-1));
            return ExitCode::from(126);
        }
        ["fexec", program, rest @ ..] => {
            let errno = held::fexec(program, rest);
            println!("error:{errno}");
            return ExitCode::from(126);
        }
        ["connect-rewritten", a, b, rest @ ..] if matches!(rest, [] | ["then-a"]) => {
            let a: std::net::SocketAddrV4 = a.parse().expect("A:PORT (IPv4)");
            let b: std::net::SocketAddrV4 = b.parse().expect("B:PORT (IPv4)");
            held::connect_rewritten(a, b);
            if rest == ["then-a"] {
                println!("again:{}", connect_errno(a.into()));
            }
        }
        _ => {
            eprintln!("usage: see the top of tests/src/bin/actor/main.rs");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// SO_LINGER 0: close sends RST and leaves no TIME_WAIT behind, so a long
/// connect loop does not exhaust loopback ports and slow itself down.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A blocking TCP connect's outcome as an errno (0 = connected).
/// A Unix socket address: a path, or `@NAME` for an abstract one.
fn unix_addr(path: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(path),
    }
}

/// 0 for success, else the errno (-1 when there is none).
fn errno_of(r: std::io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

pub fn connect_errno(addr: SocketAddr) -> i32 {
    match TcpStream::connect(addr) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// N connects that all wait in the kernel at once: to a listener with a
/// full accept queue (backlog 0, one connection queued), whose SYNs the
/// kernel drops, each until its `ms` send timeout. Returns how many
/// connect calls this made in all (the queue's filling ones included).
fn connect_blocked(n: usize, ms: i64) -> usize {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    // SAFETY: listen(2) on a socket this process owns: a backlog of 0.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().expect("addr");
    // Fill the accept queue: connects complete until one no longer does.
    let mut calls = 0;
    let mut filled = Vec::new();
    loop {
        calls += 1;
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => filled.push(s),
            Err(_) => break,
        }
        assert!(filled.len() < 8, "the accept queue never filled");
    }
    let port = addr.port();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                // SAFETY: a socket this thread owns, its options and a
                // blocking connect with plain values.
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    assert!(fd >= 0, "socket");
                    let tv = libc::timeval {
                        tv_sec: ms / 1000,
                        tv_usec: (ms % 1000) * 1000,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_SNDTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        size_of::<libc::timeval>() as u32,
                    );
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as u16,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    libc::connect(
                        fd,
                        (&sa as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as u32,
                    );
                    libc::close(fd);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("connect thread");
    }
    calls + n
}
