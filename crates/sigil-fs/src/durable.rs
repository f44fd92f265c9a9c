//! Atomic, durable replacement of a file, and private directories.
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private file: read and write for its owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of a private directory: its owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Replaces `path` with `data`, mode 0600, atomically and durably.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data, PRIVATE_FILE_MODE).map(drop)
}

/// Replaces `path` with `data`, created with `mode` (less the umask), atomically and durably.
/// For files meant to be read by others (a certificate, a bundle); secrets take
/// [`write_private`].
pub fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace(path, data, mode).map(drop)
}

/// [`write_private`], returning the new file open for reading and writing (for a file that is
/// built whole once and then updated in place).
pub fn create_private(path: &Path, data: &[u8]) -> io::Result<File> {
    replace(path, data, PRIVATE_FILE_MODE)
}

/// Creates `dir` and its missing parents with mode 0700 (a directory that exists is left as
/// it is).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Where a replacement of `path` is built before it is renamed over it: `path` with `.tmp`
/// appended.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn replace(path: &Path, data: &[u8], mode: u32) -> io::Result<File> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)?;
    Ok(f)
}

/// Syncs the directory holding `path`, so that a rename into it is durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaces_whole_and_private_leaving_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_private(&p, b"first").unwrap();
        write_private(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(mode(&p), 0o600);
        assert!(!temp_path(&p).exists());
    }

    #[test]
    fn a_replacement_is_private_even_over_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"secret").unwrap();
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn the_temporary_file_keeps_the_whole_name() {
        // Two files differing only by extension must not share a temporary file.
        assert_eq!(temp_path(Path::new("d/ca.key")), Path::new("d/ca.key.tmp"));
        assert_eq!(temp_path(Path::new("d/ca.pem")), Path::new("d/ca.pem.tmp"));
    }

    #[test]
    fn a_public_mode_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bundle.pem");
        write_with_mode(&p, b"certs", 0o644).unwrap();
        // The umask may take bits away, never add them.
        assert_eq!(mode(&p) & !0o644, 0);
        assert_eq!(mode(&p) & 0o600, 0o600);
    }

    #[test]
    fn create_private_hands_back_the_file_open_for_updates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.slots");
        let mut f = create_private(&p, b"0123456789").unwrap();
        f.seek(SeekFrom::Start(2)).unwrap();
        f.write_all(b"xy").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut back = String::new();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "01xy456789");
        assert_eq!(std::fs::read(&p).unwrap(), b"01xy456789");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn a_bare_file_name_is_in_the_current_directory() {
        // The directory to sync is ".", not "" (which cannot be opened).
        assert!(sync_parent(Path::new("just-a-name")).is_ok());
    }

    #[test]
    fn private_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        create_private_dir(&d).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_stray_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/key.pem");
        assert_eq!(
            write_private(&p, b"x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
