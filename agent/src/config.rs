//! Daemon and CLI configuration (TOML). Every default lives here, commented.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/airlock/airlock.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The whole configuration. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the SQLite store (`airlock.db`). Default `/var/lib/airlock`.
    pub data_dir: PathBuf,
    /// Unix socket on which the daemon takes registrations and status
    /// requests. Default `/run/airlock/airlock.sock`.
    pub socket_path: PathBuf,
    /// Group whose members may use the socket besides root. Default: none,
    /// root only.
    pub socket_group: Option<String>,
    /// Events per SQLite transaction at most. Default 4096.
    pub batch_max: usize,
    /// How often the loss counters are turned into loss records, in ms.
    /// Default 1000.
    pub loss_poll_ms: u64,
    /// Size of the kernel-to-daemon ring buffer in KiB: a power of two, at
    /// least 4. Default 32768 (32 MiB, about 40,000 exec events in flight).
    pub ring_buffer_kib: u32,
    /// Connects of watched processes that may be in flight at once with
    /// their outcome still to come (the kernel's pending-connect map). One
    /// more is recorded at once without its outcome, and the lost outcome
    /// is counted (`pending_map_full`). Default 8192.
    pub pending_connects: u32,
    /// Where the approval API listens. Default 127.0.0.1:7070.
    pub api_listen: SocketAddr,
    /// bpffs directory where the programs' links and shared maps are pinned,
    /// so enforcement, sessions and pending holds outlive the daemon.
    /// Default `/sys/fs/bpf/airlock`. `airlock unload` removes it.
    pub pin_dir: PathBuf,
    /// What a hold rule does when no daemon is alive to ask (its heartbeat
    /// is older than `heartbeat_timeout_ms`): `closed` refuses the action
    /// (EPERM, or SIGKILL for an exec held without BPF LSM), `open` lets it
    /// through. Either way it is recorded. Default `closed`.
    pub fail_mode: FailMode,
    /// How old the daemon's heartbeat may be before the kernel side treats
    /// the daemon as gone. Default 5000 (the daemon beats every fifth).
    pub heartbeat_timeout_ms: u64,
    /// Directories of policy files (`*.yaml`), read in this order; a file
    /// in a later directory replaces one of the same name in an earlier
    /// one. Missing directories are skipped. Default
    /// `["/usr/share/airlock/policies", "/etc/airlock/policies"]`. See
    /// policies/README.md.
    pub policy_dirs: Vec<PathBuf>,
    /// Rules used to live here; they are policy files now. Kept only to
    /// say so when an old config still has `[[rule]]`.
    #[serde(rename = "rule", default, skip_serializing)]
    legacy_rules: Option<toml::Value>,
    /// Who may approve or deny over the API (`[[approver]]`). Default: none.
    #[serde(rename = "approver")]
    pub approvers: Vec<Approver>,
}

/// The kernel side's answer to a hold when no daemon is alive.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Refuse the action (the default).
    #[default]
    Closed,
    /// Let it through.
    Open,
}

impl FailMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// An identity allowed to decide over the API.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Approver {
    /// The identity; a session whose `user` label equals it cannot be
    /// approved by it (no self-approval).
    pub name: String,
    /// Bearer token (at least 16 characters).
    pub token: String,
    /// Approver groups this approver is in (a hold rule may name groups).
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/airlock"),
            socket_path: PathBuf::from("/run/airlock/airlock.sock"),
            socket_group: None,
            batch_max: 4096,
            loss_poll_ms: 1000,
            ring_buffer_kib: 32 * 1024,
            pending_connects: 8192,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            pin_dir: PathBuf::from("/sys/fs/bpf/airlock"),
            fail_mode: FailMode::Closed,
            heartbeat_timeout_ms: 5000,
            policy_dirs: vec![
                PathBuf::from("/usr/share/airlock/policies"),
                PathBuf::from("/etc/airlock/policies"),
            ],
            legacy_rules: None,
            approvers: Vec::new(),
        }
    }
}

impl Config {
    /// Loads `path`, or the defaults when `path` is None and the default
    /// file does not exist. A file named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line(&e),
        })?;
        if config.batch_max == 0 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "batch_max must be at least 1".into(),
            });
        }
        if config.ring_buffer_kib < 4 || !config.ring_buffer_kib.is_power_of_two() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "ring_buffer_kib must be a power of two of at least 4, got {}",
                    config.ring_buffer_kib
                ),
            });
        }
        if config.pending_connects == 0 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "pending_connects must be at least 1".into(),
            });
        }
        if config.heartbeat_timeout_ms < 100 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "heartbeat_timeout_ms must be at least 100, got {}",
                    config.heartbeat_timeout_ms
                ),
            });
        }
        if !config.pin_dir.is_absolute()
            || config
                .pin_dir
                .components()
                .any(|c| c.as_os_str().to_string_lossy().contains('.'))
        {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "pin_dir must be an absolute path under a bpffs mount, without dots (bpffs refuses them), got {}",
                    config.pin_dir.display()
                ),
            });
        }
        config
            .check_approvers()
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(config)
    }

    /// Approvers make sense: one clear message if not.
    fn check_approvers(&self) -> Result<(), String> {
        if self.legacy_rules.is_some() {
            return Err(
                "`[[rule]]` tables are no longer read here: rules are policy files now (YAML in `policy_dirs`, see policies/README.md)".into(),
            );
        }
        let mut names = HashSet::new();
        for a in &self.approvers {
            if a.token.len() < 16 {
                return Err(format!(
                    "approver {:?}: token must be at least 16 characters",
                    a.name
                ));
            }
            if !names.insert(&a.name) {
                return Err(format!("approver {:?} appears twice", a.name));
            }
        }
        Ok(())
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("airlock.db")
    }

    /// The file a running daemon keeps locked: one daemon per data_dir.
    pub fn lock_path(&self) -> PathBuf {
        self.data_dir.join("airlock.lock")
    }
}

/// toml's errors span several lines with a source excerpt; keep the
/// location and the message on one line.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => format!("at byte {}: {msg}", span.start),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn overrides_apply() {
        let c = Config::parse(
            "data_dir = \"/tmp/x\"\nsocket_group = \"agents\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.db_path(), PathBuf::from("/tmp/x/airlock.db"));
        assert_eq!(c.socket_group.as_deref(), Some("agents"));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = Config::parse("data_dri = \"/tmp\"\n", Path::new("/etc/a.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/a.toml: at byte 0: unknown field `data_dri`"),
            "{msg}"
        );
    }

    #[test]
    fn approvers_parse_and_old_rules_are_refused() {
        let c = Config::parse(
            "policy_dirs = [\"/srv/policies\"]\n\n[[approver]]\nname = \"alice\"\ntoken = \"0123456789abcdef\"\ngroups = [\"security\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.approvers[0].name, "alice");
        assert_eq!(c.approvers[0].groups, vec!["security"]);
        assert_eq!(c.policy_dirs, vec![PathBuf::from("/srv/policies")]);
        let bad = |text: &str| {
            Config::parse(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad("[[rule]]\nname = \"x\"\naction = \"hold\"\nexec = [\"/a\"]\n")
                .contains("rules are policy files now")
        );
        assert_eq!(
            bad("[[approver]]\nname = \"bob\"\ntoken = \"short\"\n"),
            "a.toml: approver \"bob\": token must be at least 16 characters"
        );
    }

    #[test]
    fn ring_buffer_size_is_checked() {
        let e = Config::parse("ring_buffer_kib = 100\n", Path::new("a.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.toml: ring_buffer_kib must be a power of two of at least 4, got 100"
        );
        assert_eq!(
            Config::parse("ring_buffer_kib = 4\n", Path::new("a.toml"))
                .unwrap()
                .ring_buffer_kib,
            4
        );
    }

    #[test]
    fn missing_default_file_is_fine_but_named_file_is_not() {
        let e = Config::load(Some(Path::new("/nonexistent/airlock.toml"))).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/airlock.toml: "),
            "{e}"
        );
    }
}
