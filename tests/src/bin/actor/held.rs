//! Actor subcommands for the hold tests that need more than one syscall:
//! a multi-threaded process held in one thread.

use std::{
    fs::OpenOptions,
    net::{SocketAddr, TcpStream},
    os::unix::fs::FileExt,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
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
            .spawn(|| match TcpStream::connect(addr) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            })
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
