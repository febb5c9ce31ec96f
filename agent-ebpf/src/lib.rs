#![no_std]
// This file exists so `cargo test`/`clippy` can see a library target.
