//! The policy in force, with what it takes to apply it on this host: its
//! kernel candidates and the executables it names, found by file.

use crate::{exefile::ExeIndex, policy::Policy, policy::candidates::Candidates};

pub struct InForce {
    pub policy: Policy,
    pub candidates: Candidates,
    /// The files the exec rules name, the sockets the connect rules name
    /// and the files the file rules name, by device and inode: the broker
    /// knows a hard link or a symlink of one by them.
    pub exes: ExeIndex,
}

impl InForce {
    /// Works out the candidates and looks the named executables up (a few
    /// `stat`s per name: call it off the runtime's threads when it can wait).
    pub fn new(policy: Policy) -> Self {
        let candidates = policy.candidates();
        let exes = ExeIndex::of(&candidates);
        Self {
            policy,
            candidates,
            exes,
        }
    }
}
