//! Which QEMU a reference run starts, and its version as the binary itself reports it: the
//! installed `qemu-system-x86_64` (QEMU 10.0 from bookworm-backports, `install-deps.sh
//! --with-qemu`) and bookworm's QEMU 7.2 that `resources/fetch-qemu72.sh` unpacks next to it
//! without installing it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{io_err, resources_out, QemuError};

/// The installed QEMU.
pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// A QEMU binary with the firmware and module directories it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// The `qemu-system-x86_64` executable.
    pub path: PathBuf,
    /// Firmware directories (`-L`): QEMU's own ROMs and SeaBIOS.
    pub firmware: Vec<PathBuf>,
    /// `QEMU_MODULE_DIR` of an unpacked QEMU, so that it does not load the installed QEMU's
    /// modules; `None` for the installed one.
    pub module_dir: Option<PathBuf>,
}

impl QemuBinary {
    /// A QEMU unpacked under `dir` (`dir/usr/bin`, `dir/usr/share`, `dir/usr/lib`).
    pub fn unpacked(dir: &Path) -> Self {
        QemuBinary {
            path: dir.join("usr/bin/qemu-system-x86_64"),
            firmware: vec![dir.join("usr/share/qemu"), dir.join("usr/share/seabios")],
            module_dir: Some(dir.join("usr/lib/x86_64-linux-gnu/qemu")),
        }
    }

    /// QEMU 7.2 where `resources/fetch-qemu72.sh` unpacks it.
    pub fn fetched_72() -> Self {
        Self::unpacked(&resources_out().join("qemu-7.2"))
    }

    /// The installed QEMU ([`SYSTEM_QEMU`], firmware in `/usr/share`).
    pub fn system() -> Self {
        QemuBinary {
            path: PathBuf::from(SYSTEM_QEMU),
            firmware: vec![
                PathBuf::from("/usr/share/qemu"),
                PathBuf::from("/usr/share/seabios"),
            ],
            module_dir: None,
        }
    }

    /// A command running this QEMU (its module directory set, no arguments yet).
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        if let Some(dir) = &self.module_dir {
            c.env("QEMU_MODULE_DIR", dir);
        }
        c
    }

    /// The `-L DIR` arguments.
    pub fn firmware_args(&self) -> Vec<String> {
        self.firmware
            .iter()
            .flat_map(|d| ["-L".to_string(), d.display().to_string()])
            .collect()
    }

    /// The version the binary reports (`qemu-system-x86_64 --version`), e.g. `10.0.2`.
    pub fn version(&self) -> Result<String, QemuError> {
        if !self.path.exists() {
            return Err(QemuError::Missing(self.path.clone()));
        }
        let out = self
            .command()
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("run {} --version", self.path.display())))?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_version(&text).ok_or_else(|| QemuError::Version {
            binary: self.path.clone(),
            output: text.lines().next().unwrap_or_default().to_string(),
        })
    }
}

/// The version in QEMU's `--version` output: `QEMU emulator version 10.0.2 (Debian ...)` gives
/// `10.0.2`.
pub fn parse_version(output: &str) -> Option<String> {
    let rest = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("QEMU emulator version "))?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = v.trim_end_matches('.');
    (!v.is_empty() && v.starts_with(|c: char| c.is_ascii_digit())).then(|| v.to_string())
}

/// The reference QEMUs present on this machine, each with the version it reports: the installed
/// one, then the unpacked 7.2. A binary that is missing or does not report a version is left
/// out; a second binary of the same version too.
pub fn reference_qemus() -> Vec<(QemuBinary, String)> {
    let mut found: Vec<(QemuBinary, String)> = Vec::new();
    for b in [QemuBinary::system(), QemuBinary::fetched_72()] {
        if let Ok(v) = b.version() {
            if found.iter().all(|(_, seen)| *seen != v) {
                found.push((b, v));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_the_first_version_line() {
        let ten = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(ten).as_deref(), Some("10.0.2"));
        let old = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n";
        assert_eq!(parse_version(old).as_deref(), Some("7.2.22"));
        assert_eq!(
            parse_version("QEMU emulator version 9.1.0\n").as_deref(),
            Some("9.1.0")
        );
        assert_eq!(parse_version("qemu-system-x86_64: unknown option"), None);
        assert_eq!(parse_version("QEMU emulator version (none)"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn unpacked_qemu_gets_its_own_modules_and_firmware() {
        let b = QemuBinary::unpacked(Path::new("/q"));
        assert_eq!(b.path, Path::new("/q/usr/bin/qemu-system-x86_64"));
        assert_eq!(
            b.firmware_args(),
            ["-L", "/q/usr/share/qemu", "-L", "/q/usr/share/seabios"]
        );
        let c = b.command();
        let env: Vec<_> = c.get_envs().collect();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].0, "QEMU_MODULE_DIR");
        assert!(QemuBinary::system().command().get_envs().next().is_none());
    }

    #[test]
    fn a_missing_binary_has_no_version() {
        let b = QemuBinary::unpacked(Path::new("/nonexistent/qemu"));
        assert!(matches!(b.version(), Err(QemuError::Missing(_))));
    }
}
