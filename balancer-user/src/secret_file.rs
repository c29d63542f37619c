//! Whether the configuration file gives its secret away.
//!
//! `[stats] admin_token` lets whoever knows it drain or take every server out of service.
//! Like ssh with a private key, mxlb says so when the file that holds the token can be read
//! by any user of the host. Group read stays quiet: with `[global] user` the daemon re-reads
//! the file on SIGHUP as that user, so `root:mxlb 0640` is the right mode, not a leak. It
//! warns rather than refuses: a config file from a package or a configuration manager often
//! starts as 0644, and refusing would turn a hardening hint into an outage at the next
//! restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;

/// The permission bit that lets any user read the file.
const READABLE_BY_OTHERS: u32 = 0o004;

/// A warning when `config` (read from `path`) holds an admin token in a file that any
/// user can read; `None` when there is no token, or the mode is tight, or
/// the mode cannot be read (the file was just read, so that is a race not worth a word).
pub fn token_exposure(path: &Path, config: &Config) -> Option<String> {
    config.stats.as_ref()?.admin_token.as_ref()?;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    exposure_warning(path, mode)
}

fn exposure_warning(path: &Path, mode: u32) -> Option<String> {
    let mode = mode & 0o777;
    (mode & READABLE_BY_OTHERS != 0).then(|| {
        format!(
            "{}: holds [stats] admin_token but its mode {mode:04o} lets other users read it; \
             run `chmod o-r {}` (0640 with the daemon's group, or 0600)",
            path.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(token: bool) -> Config {
        let stats = if token {
            "[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = \"s3cret\"\n"
        } else {
            "[stats]\nbind = \"127.0.0.1:8404\"\n"
        };
        let text = format!(
            "{stats}[[listen]]\nname = \"smtp\"\nbind = [\"127.0.0.1:2525\"]\n\
             [[listen.server]]\nname = \"mx1\"\naddr = \"127.0.0.1:2526\"\n"
        );
        Config::parse(&text, "test.toml").unwrap()
    }

    fn file_with_mode(mode: u32) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn world_or_group_readable_token_is_reported() {
        for mode in [0o644, 0o604, 0o666, 0o755] {
            let file = file_with_mode(mode);
            let warning = token_exposure(file.path(), &config(true)).expect("a warning");
            assert!(warning.contains(&format!("{mode:04o}")), "{warning}");
            assert!(warning.contains("chmod o-r"), "{warning}");
        }
    }

    #[test]
    fn owner_or_group_token_is_fine() {
        for mode in [0o600, 0o400, 0o700, 0o640, 0o660] {
            let file = file_with_mode(mode);
            assert_eq!(token_exposure(file.path(), &config(true)), None, "{mode:o}");
        }
    }

    #[test]
    fn no_token_no_warning() {
        let file = file_with_mode(0o644);
        assert_eq!(token_exposure(file.path(), &config(false)), None);
    }

    #[test]
    fn only_permission_bits_count() {
        // st_mode carries the file type too (0o100000 for a regular file).
        assert_eq!(exposure_warning(Path::new("x"), 0o100600), None);
        assert!(exposure_warning(Path::new("x"), 0o100644).is_some());
    }
}
