//! Airlock's kernel programs. Each module is one probe family; every program
//! is a thin entry that calls a `try_` function, and names mirror userspace
//! (`agent/src/sensors/`).
#![no_std]
#![no_main]

mod exec;
mod hold;
mod lsm;
mod maps;
mod net;
mod session;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
