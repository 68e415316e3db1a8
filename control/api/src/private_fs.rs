//! Files only this user may read: the data dir (the CA key, password hashes, login tokens live in
//! its SQLite file) is 0700 and what is in it 0600, whatever the umask, and loosened modes left
//! by an older Sluice or an operator are tightened at every start.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What was tightened, so the caller can warn about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub path: std::path::PathBuf,
    /// The mode it had (permission bits only).
    pub was: u32,
}

/// Creates `dir` (and missing parents) as 0700, or tightens it to 0700 if group or others had
/// any access.
pub fn private_dir(dir: &Path) -> std::io::Result<Option<Tightened>> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    tighten(dir, 0o700)
}

/// Sets `path` to `mode` if it grants group or others anything; a missing file is fine.
fn tighten(path: &Path, mode: u32) -> std::io::Result<Option<Tightened>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let was = meta.permissions().mode() & 0o777;
    if was & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode))?;
    Ok(Some(Tightened { path: path.to_path_buf(), was }))
}

/// Tightens every regular file directly in `dir` to 0600 (sockets and subdirectories are left
/// alone: a local-socket directory must stay reachable by the clients it serves).
pub fn private_files_in(dir: &Path) -> std::io::Result<Vec<Tightened>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            out.extend(tighten(&entry.path(), 0o600)?);
        }
    }
    Ok(out)
}

/// Opens (creating if needed) a file that is 0600 from its first byte, for appending.
pub fn open_private_append(path: &Path) -> std::io::Result<std::fs::File> {
    let f = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    tighten(path, 0o600)?;
    Ok(f)
}

/// Writes `contents` to a file that is 0600 from its creation, replacing what was there.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    tighten(path, 0o600)?;
    f.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn loose_dirs_and_files_are_tightened_and_reported() {
        let base = std::env::temp_dir().join(format!("sluice-private-{}", std::process::id()));
        let dir = base.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("a"), b"x").unwrap();
        std::fs::set_permissions(dir.join("a"), Permissions::from_mode(0o644)).unwrap();
        std::fs::write(dir.join("b"), b"x").unwrap();
        std::fs::set_permissions(dir.join("b"), Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::set_permissions(dir.join("sub"), Permissions::from_mode(0o755)).unwrap();

        assert_eq!(private_dir(&dir).unwrap(), Some(Tightened { path: dir.clone(), was: 0o755 }));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(private_dir(&dir).unwrap(), None);
        let t = private_files_in(&dir).unwrap();
        assert_eq!(t, vec![Tightened { path: dir.join("a"), was: 0o644 }]);
        assert_eq!((mode(&dir.join("a")), mode(&dir.join("b"))), (0o600, 0o600));
        assert_eq!(mode(&dir.join("sub")), 0o755);

        let fresh = base.join("x/y");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        write_private(&fresh.join("k"), b"secret").unwrap();
        assert_eq!(mode(&fresh.join("k")), 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
