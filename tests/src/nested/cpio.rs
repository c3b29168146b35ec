//! A minimal writer for the `newc` cpio format, enough to append a few
//! files to a Linux initramfs.

fn pad4(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(4), 0);
}

fn header(v: &mut Vec<u8>, ino: u32, mode: u32, name: &str, size: usize) {
    let namesize = name.len() + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(size).unwrap_or(u32::MAX),
        0,
        0,
        0,
        0,
        u32::try_from(namesize).unwrap_or(u32::MAX),
        0,
    ];
    v.extend_from_slice(b"070701");
    for f in fields {
        v.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    pad4(v);
}

/// A newc archive of regular files `(name, permission bits, contents)` in
/// the archive's root, with its trailer.
pub fn archive(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, (name, perm, data)) in files.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        header(&mut v, ino, 0o100_000 | (perm & 0o7777), name, data.len());
        v.extend_from_slice(data);
        pad4(&mut v);
    }
    header(&mut v, 0, 0, "TRAILER!!!", 0);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_system_cpio_reads_it_back() {
        let a = archive(&[
            ("scenarios.sh", 0o755, b"echo hi\n"),
            ("x", 0o644, b"12345"),
        ]);
        assert_eq!(a.len() % 4, 0);
        let dir = std::env::temp_dir().join(format!("iovmm-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (Debian package cpio) is installed by install-deps.sh");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&a).unwrap();
        assert!(child.wait().unwrap().success());
        let script = dir.join("scenarios.sh");
        assert_eq!(std::fs::read(&script).unwrap(), b"echo hi\n");
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"12345");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&script).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
