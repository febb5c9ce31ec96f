//! Daemon and CLI configuration (TOML). Every default lives here, commented.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// Longest time an event waits before its batch is written, in ms.
    /// Default 50.
    pub batch_interval_ms: u64,
    /// How often the loss counters are turned into loss records, in ms.
    /// Default 1000.
    pub loss_poll_ms: u64,
    /// Size of the kernel-to-daemon ring buffer in KiB: a power of two, at
    /// least 4. Default 32768 (32 MiB, about 40,000 exec events in flight).
    pub ring_buffer_kib: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/airlock"),
            socket_path: PathBuf::from("/run/airlock/airlock.sock"),
            socket_group: None,
            batch_max: 4096,
            batch_interval_ms: 50,
            loss_poll_ms: 1000,
            ring_buffer_kib: 32 * 1024,
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
        Ok(config)
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("airlock.db")
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
