//! Configuration of the control API socket and the periodic metrics line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Default interval of the metrics line, in seconds (as Firecracker's).
pub const DEFAULT_METRICS_INTERVAL: u64 = 60;
/// Longest metrics interval accepted, in seconds.
pub const MAX_METRICS_INTERVAL: u64 = 3600;

fn default_interval() -> u64 {
    DEFAULT_METRICS_INTERVAL
}

/// `--metrics PATH[,interval=SECS]`: one JSON line of every counter every `interval` seconds
/// (and one when the VM stops), appended to a file or written into a FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or FIFO the lines go to.
    pub path: PathBuf,
    /// Seconds between two lines (1 to [`MAX_METRICS_INTERVAL`]).
    #[serde(default = "default_interval")]
    pub interval: u64,
}

impl MetricsConfig {
    fn option_error(s: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Option {
            name: "--metrics",
            value: s.to_string(),
            reason: reason.into(),
        }
    }

    /// Checks the interval and that the path's directory exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_METRICS_INTERVAL).contains(&self.interval) {
            return Err(ConfigError::Combination(format!(
                "metrics interval {} s: use 1 to {MAX_METRICS_INTERVAL}",
                self.interval
            )));
        }
        check_parent("metrics", &self.path)
    }
}

impl FromStr for MetricsConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
            Self::option_error(s, "the first part must be the path of a file or FIFO")
        })?;
        let mut cfg = MetricsConfig {
            path: path.into(),
            interval: DEFAULT_METRICS_INTERVAL,
        };
        for part in parts {
            let secs = part
                .strip_prefix("interval=")
                .ok_or_else(|| Self::option_error(s, format!("unknown option {part:?}")))?;
            cfg.interval = secs
                .parse()
                .map_err(|_| Self::option_error(s, "interval=SECS needs a whole number"))?;
        }
        Ok(cfg)
    }
}

impl fmt::Display for MetricsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},interval={}", self.path.display(), self.interval)
    }
}

/// Checks an API socket path: not empty, short enough for `sun_path`, in an existing directory.
pub fn validate_api_socket(path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_SOCKET_PATH {
        return Err(ConfigError::Combination(format!(
            "API socket path {path:?} is {len} bytes: use 1 to {MAX_SOCKET_PATH}"
        )));
    }
    check_parent("API socket", path)
}

fn check_parent(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.is_dir() {
        return Ok(());
    }
    Err(ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason: format!("directory {parent:?} does not exist"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn metrics_option_parses_path_and_interval() {
        let m: MetricsConfig = "/tmp/m.fifo,interval=5".parse().unwrap();
        assert_eq!(
            (m.path.as_path(), m.interval),
            (Path::new("/tmp/m.fifo"), 5)
        );
        let m: MetricsConfig = "/tmp/m.json".parse().unwrap();
        assert_eq!(m.interval, DEFAULT_METRICS_INTERVAL);
        assert_eq!(m.to_string().parse::<MetricsConfig>().unwrap(), m);
        for bad in ["", ",interval=5", "/tmp/m,interval=x", "/tmp/m,every=5"] {
            assert!(bad.parse::<MetricsConfig>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn metrics_validation_checks_interval_and_directory() {
        let mut m: MetricsConfig = "/tmp/m.json,interval=0".parse().unwrap();
        assert!(m.validate().unwrap_err().to_string().contains("interval"));
        m.interval = 1;
        m.validate().unwrap();
        m.path = "/nonexistent-dir/m.json".into();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        let j: MetricsConfig = serde_json::from_str(r#"{"path":"/tmp/m"}"#).unwrap();
        assert_eq!(j.interval, DEFAULT_METRICS_INTERVAL);
    }

    #[test]
    fn api_socket_paths_must_fit_sun_path() {
        validate_api_socket(Path::new("/tmp/api.sock")).unwrap();
        validate_api_socket(Path::new("api.sock")).unwrap();
        let long = format!("/tmp/{}", "x".repeat(MAX_SOCKET_PATH));
        assert!(validate_api_socket(Path::new(&long)).is_err());
        assert!(validate_api_socket(Path::new("")).is_err());
        assert!(validate_api_socket(Path::new("/nonexistent-dir/a.sock")).is_err());
    }
}
