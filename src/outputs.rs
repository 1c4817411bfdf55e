//! The local files a run writes — the result file, the spool directory, `diff --output` — checked
//! before containerd is asked anything, so a typo fails in milliseconds with the sandbox untouched
//! instead of after a pause and a push. `diff` writes its blob to a temporary file next to the
//! output and renames it into place only when the layer is complete: a failed diff leaves no
//! partial file, and an existing one is left as it was.

use crate::cli::UsageError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `dir` must be a directory we can create files in (a probe file is created and removed).
fn check_writable_dir(flag: &str, dir: &Path) -> Result<(), UsageError> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Err(e) => Err(UsageError(format!(
            "{flag}: directory {shown} is not usable ({e})"
        ))),
        Ok(m) if !m.is_dir() => Err(UsageError(format!("{flag}: {shown} is not a directory"))),
        Ok(_) => tempfile::Builder::new()
            .prefix(".committer-probe-")
            .tempfile_in(dir)
            .map(drop)
            .map_err(|e| UsageError(format!("{flag}: cannot create files in {shown} ({e})"))),
    }
}

/// The directory a file path would be created in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The result file: an existing file we may write (the kubelet's /dev/termination-log), or a
/// new one in a writable directory.
pub fn check_result_file(path: &Path) -> Result<(), UsageError> {
    if path.is_dir() {
        return Err(UsageError(format!(
            "--result-file {}: is a directory; give a file path",
            path.display()
        )));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| {
                UsageError(format!(
                    "--result-file {}: cannot write it ({e})",
                    path.display()
                ))
            });
    }
    check_writable_dir(
        &format!("--result-file {}", path.display()),
        parent_dir(path),
    )
}

/// The spool directory (default: the system temp dir).
pub fn check_spool_dir(dir: Option<&Path>) -> Result<(), UsageError> {
    match dir {
        Some(d) => check_writable_dir(&format!("--spool-dir {}", d.display()), d),
        None => check_writable_dir(
            "the temp dir (set TMPDIR or pass --spool-dir)",
            &std::env::temp_dir(),
        ),
    }
}

/// Where `diff` writes the blob until it is complete.
pub struct DiffOutput {
    /// The final path; None: stdout.
    dest: Option<PathBuf>,
    temp: tempfile::TempPath,
}

impl DiffOutput {
    /// `-` is stdout (the blob is staged in the temp dir, then copied out).
    pub fn prepare(output: &Path) -> Result<DiffOutput, UsageError> {
        let to_stdout = output == Path::new("-");
        if !to_stdout && output.is_dir() {
            return Err(UsageError(format!(
                "--output {}: is a directory; give a file path",
                output.display()
            )));
        }
        let dir = if to_stdout {
            std::env::temp_dir()
        } else {
            parent_dir(output).to_path_buf()
        };
        let flag = format!("--output {}", output.display());
        check_writable_dir(&flag, &dir)?;
        let temp = tempfile::Builder::new()
            .prefix(".committer-diff-")
            .tempfile_in(&dir)
            .map_err(|e| UsageError(format!("{flag}: {e}")))?
            .into_temp_path();
        // Removed by the supervisor if this process is killed before the TempPath's drop can.
        crate::guard::tell_owned_path(&temp);
        Ok(DiffOutput {
            dest: (!to_stdout).then(|| output.to_path_buf()),
            temp,
        })
    }

    /// The file the layer is written to.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    pub fn is_stdout(&self) -> bool {
        self.dest.is_none()
    }

    /// Moves the complete blob into place, or copies it to stdout (the staged file is removed).
    pub fn finish(self) -> std::io::Result<()> {
        let staged = self.temp.to_path_buf();
        let done = match self.dest {
            Some(dest) => self.temp.persist(&dest).map_err(|e| e.error),
            None => {
                let mut f = std::fs::File::open(&self.temp)?;
                let mut out = std::io::stdout().lock();
                std::io::copy(&mut f, &mut out)?;
                out.flush()
            }
        };
        if done.is_ok() {
            // Renamed into place (or copied out and removed on drop): nothing left to remove.
            crate::guard::tell_released_path(&staged);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_unwritable_places_are_refused_before_work() {
        assert!(check_result_file(Path::new("/nonexistent/dir/r.json")).is_err());
        assert!(check_result_file(Path::new("/")).is_err());
        assert!(check_spool_dir(Some(Path::new("/nonexistent"))).is_err());
        assert!(check_spool_dir(Some(Path::new("/etc/hostname"))).is_err());
        assert!(DiffOutput::prepare(Path::new("/nonexistent/x.tar")).is_err());
    }

    #[test]
    fn a_diff_output_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer.tar");
        let out = DiffOutput::prepare(&dest).unwrap();
        std::fs::write(out.path(), b"blob").unwrap();
        assert!(!dest.exists());
        out.finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"blob");
        let failed = DiffOutput::prepare(&dir.path().join("other.tar")).unwrap();
        std::fs::write(failed.path(), b"partial").unwrap();
        drop(failed);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the finished output is left");
    }
}
