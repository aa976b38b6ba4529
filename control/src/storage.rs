//! Where backups live. `LocalStorage` keeps them under `<data dir>/backups`; an S3-compatible
//! object store can implement the same trait (objects are written once, read whole, deleted).

use std::path::{Path, PathBuf};

/// A place for backup files, addressed by key (`<database id>/<backup id>.dump`).
pub trait BackupStorage: Send + Sync + 'static {
    /// Moves a finished local file into the store under `key`.
    fn store(&self, key: &str, file: &Path) -> std::io::Result<()>;
    /// The stored object as a local file to read (a download cache for remote stores).
    fn fetch(&self, key: &str) -> std::io::Result<PathBuf>;
    fn delete(&self, key: &str) -> std::io::Result<()>;
    /// Deletes every object under `prefix` (a database id): everything kept for it.
    fn purge(&self, prefix: &str) -> std::io::Result<()>;
    /// A local scratch directory for files being written.
    fn scratch(&self) -> PathBuf;
}

pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens (creates) the store at `root`, private to this user (0700 whatever the umask).
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        crate::files::private_dir(&root)?;
        crate::files::private_dir(&root.join(".scratch"))?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> std::io::Result<PathBuf> {
        if key.split('/').any(|part| part.is_empty() || part == ".." || part.starts_with('.')) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad backup key {key:?}"),
            ));
        }
        Ok(self.root.join(key))
    }
}

impl BackupStorage for LocalStorage {
    fn store(&self, key: &str, file: &Path) -> std::io::Result<()> {
        crate::files::blocking_io(|| self.store_now(key, file))
    }

    fn fetch(&self, key: &str) -> std::io::Result<PathBuf> {
        let path = self.path(key)?;
        crate::files::blocking_io(|| path.metadata())?;
        Ok(path)
    }

    fn delete(&self, key: &str) -> std::io::Result<()> {
        let path = self.path(key)?;
        match crate::files::blocking_io(|| std::fs::remove_file(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn purge(&self, prefix: &str) -> std::io::Result<()> {
        let path = self.path(prefix)?;
        match crate::files::blocking_io(|| std::fs::remove_dir_all(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn scratch(&self) -> PathBuf {
        self.root.join(".scratch")
    }
}

impl LocalStorage {
    fn store_now(&self, key: &str, file: &Path) -> std::io::Result<()> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            crate::files::private_dir(parent)?;
        }
        std::fs::rename(file, &path)?;
        std::fs::File::open(path.parent().unwrap_or(&self.root))?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStorage::new(dir.path().join("b")).unwrap();
        let file = store.scratch().join("x");
        std::fs::write(&file, b"data").unwrap();
        assert!(store.store("../evil", &file).is_err());
        assert!(store.store("db/.hidden", &file).is_err());
        store.store("db/bk-1.dump", &file).unwrap();
        assert_eq!(std::fs::read(store.fetch("db/bk-1.dump").unwrap()).unwrap(), b"data");
        store.delete("db/bk-1.dump").unwrap();
        assert!(store.fetch("db/bk-1.dump").is_err());
        store.delete("db/bk-1.dump").unwrap();
    }
}
