//! Kinds of actions, the policy's decisions on them, and what a hold does
//! when nobody decides in time.

use serde::{Deserialize, Serialize};

/// What a watched process tried to do, as rules and requests name it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Exec,
    Connect,
    File,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Connect => "connect",
            Self::File => "file",
        }
    }

    /// The system call a held action of this kind waits in.
    pub fn syscall(self) -> &'static str {
        match self {
            Self::Exec => "execve",
            Self::Connect => "connect",
            Self::File => "open",
        }
    }
}

/// What a rule decides.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Record,
    Hold,
    Deny,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Record => "record",
            Self::Hold => "hold",
            Self::Deny => "deny",
        }
    }

    /// Rank at equal priority: the more severe first.
    pub fn severity_rank(self) -> u8 {
        match self {
            Self::Deny => 0,
            Self::Hold => 1,
            Self::Allow => 2,
            Self::Record => 3,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Allow, Self::Record, Self::Hold, Self::Deny]
            .into_iter()
            .find(|d| d.name() == s)
    }
}

/// How a held action ends when nobody decides in time.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Refuse it (the default).
    #[default]
    Deny,
    /// Let it through.
    Allow,
}

impl OnTimeout {
    pub fn name(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }
}
