//! The pid file of a running process, and signalling that process (`-s reload|stop`).

use std::path::{Path, PathBuf};

use crate::config::options::ProcessSignal;

/// A pid file that cannot be written or read, or a process that cannot be signalled.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PidFileError(String);

/// A pid file holding this process's id; removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's id to `path`. Refuses when the file names another live process.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        if let Some(pid) = read_pid(path).ok().filter(|&pid| is_alive(pid) && pid != std::process::id()) {
            return Err(PidFileError(format!(
                "pid-file {}: process {pid} is running already",
                path.display()
            )));
        }
        // Written beside and renamed into place, so a reader never sees a half-written file.
        let partial = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::write(&partial, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&partial, path));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(PidFileError(format!("pid-file {}: {err}", path.display())));
        }
        Ok(PidFile { path: path.to_owned() })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path).is_ok_and(|pid| pid == std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads a pid file.
fn read_pid(path: &Path) -> Result<u32, PidFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PidFileError(format!("pid-file {}: {e}", path.display())))?;
    text.trim().parse().map_err(|_| PidFileError(format!("pid-file {}: no process id in it", path.display())))
}

#[cfg(unix)]
fn is_alive(pid: u32) -> bool {
    // No signal: only checks that the process exists.
    i32::try_from(pid).is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

#[cfg(not(unix))]
fn is_alive(_pid: u32) -> bool {
    false
}

/// Sends `signal` to the process named in the pid file; returns its id.
#[cfg(unix)]
pub fn signal_process(path: &Path, signal: ProcessSignal) -> Result<u32, PidFileError> {
    let pid = read_pid(path)?;
    use nix::sys::signal::Signal;
    let number = match signal {
        ProcessSignal::Reload => Signal::SIGHUP,
        ProcessSignal::Stop => Signal::SIGTERM,
    };
    let target = i32::try_from(pid)
        .map_err(|_| PidFileError(format!("pid-file {}: bad process id {pid}", path.display())))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), number)
        .map_err(|e| PidFileError(format!("cannot signal process {pid}: {e}")))?;
    Ok(pid)
}

/// Signals need a Unix system.
#[cfg(not(unix))]
pub fn signal_process(_path: &Path, _signal: ProcessSignal) -> Result<u32, PidFileError> {
    Err(PidFileError("-s needs a Unix system".into()))
}
