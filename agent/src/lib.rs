//! Airlock: records (and holds) what AI-agent processes do.
//!
//! The binary is a thin shell over this library so the end-to-end tests and
//! xtask can share its feature check and store reader.
//!
//! # Floors
//!
//! The modules stand on three floors, and imports only point down (or
//! sideways within the middle, for plain data). The test `floors_hold` (in
//! `floors.rs`) reads every path in the sources that names a module of
//! this crate and fails on any other import.
//!
//! 1. **Bottom, pure data**: [`model`] (records, process identity,
//!    approval requests, kinds, enforcement, time). Imports nothing of this
//!    crate.
//! 2. **Middle, engines without channels**: [`config`], [`policy`] (the
//!    language, evaluation, kernel candidates), [`bpf`] (the one owner of
//!    the `Ebpf` object: load, attach, pin, decode, candidate maps),
//!    [`store`] (SQLite; imports [`model`] only), [`procfs`], [`features`],
//!    [`exefile`] (the executables a policy names, by device and inode),
//!    [`ctl`] (the control socket's protocol and client). They import
//!    [`model`] and each other for plain data, never [`daemon`] or [`cli`];
//!    [`policy`] and [`store`] import [`model`] only.
//! 3. **Top**: [`daemon`], the only place with channels, tasks and
//!    threads (assembly, typed handles, router, broker, recorder, reload,
//!    control socket server (`control.rs`), API). [`cli`] stands beside it: it talks to a
//!    running daemon only through the control-socket and API clients, and
//!    of [`daemon`] uses only `daemon::run` (to be it).

pub mod bpf;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod exefile;
pub mod features;
pub mod model;
pub mod policy;
pub mod procfs;
pub mod store;

#[cfg(test)]
mod floors;
