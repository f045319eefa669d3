//! Files that hold secrets: private keys, token keys, and the databases that carry them (`raft.redb`
//! holds the token keys, the queue store holds notification payloads). Each is created readable by its
//! owner only (0600), and one found with wider permissions is narrowed when it is opened, so a node
//! upgraded from an older layout does not keep world-readable secrets. No other module sets file modes.

use std::io::Write;
use std::path::Path;

/// Narrows `file` to 0600 (a no-op off Unix).
fn owner_only(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

fn open_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

/// Writes a file only its owner can read, creating parent directories; an existing file is replaced and
/// narrowed to 0600 before anything is written to it.
pub fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = open_options().truncate(true).open(path)?;
    owner_only(&file)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes sure the file at `path` exists and only its owner can read it, without touching its contents:
/// called before an embedded database opens it, since the database creates files with the default mode.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = open_options().truncate(false).open(path)?;
    owner_only(&file)
}

/// The permission bits of `path` (Unix), for tests and checks.
#[cfg(unix)]
pub fn mode(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_owner_only_even_when_the_file_was_wider() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sub/a.key");
        write_secret(&key, b"one").unwrap();
        assert_eq!(mode(&key).unwrap(), 0o600);
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        write_secret(&key, b"two").unwrap();
        assert_eq!(mode(&key).unwrap(), 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"two");

        let db = dir.path().join("data/x.redb");
        restrict(&db).unwrap();
        assert_eq!(mode(&db).unwrap(), 0o600);
        std::fs::write(&db, b"kept").unwrap();
        std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();
        restrict(&db).unwrap();
        assert_eq!(mode(&db).unwrap(), 0o600);
        assert_eq!(std::fs::read(&db).unwrap(), b"kept", "restrict must not truncate");
    }
}
