//! Airlock: records (and, with BPF LSM, holds) what AI-agent processes do.
//!
//! The binary is a thin shell over this library so the end-to-end tests and
//! xtask can share its feature check and store reader.

pub mod api;
pub mod broker;
pub mod btf;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod event;
pub mod features;
pub mod policy;
pub mod recorder;
pub mod sensors;
pub mod stats;
pub mod store;
