//! What a lab owns, on disk while it runs: `/run/tenet/lab/<pid>/owner.json` names the lab's
//! own process (pid and start time), the processes it started, its namespaces and its
//! directories. A lab killed outright leaves the record behind; the next `tenet lab` finds the
//! owner gone and removes exactly what the record lists — a process only while its pid still
//! has the recorded start time, so a reused pid is never killed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tenet::process::procfs;
use tracing::{info, warn};

/// Where labs keep their records and files.
pub const LAB_ROOT: &str = "/run/tenet/lab";
const RECORD: &str = "owner.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct OwnedProcess {
    name: String,
    pid: u32,
    start_time: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    pid: u32,
    start_time: u64,
    processes: Vec<OwnedProcess>,
    namespaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

/// This lab's record, rewritten as it acquires things. Dropping it removes the record and the
/// lab's directory: by then everything it lists is gone.
pub struct Ownership {
    dir: PathBuf,
    record: Mutex<Record>,
}

impl Ownership {
    /// Claims `/run/tenet/lab/<pid>/` for this process.
    pub fn claim() -> anyhow::Result<Ownership> {
        let pid = std::process::id();
        let dir = Path::new(LAB_ROOT).join(pid.to_string());
        // A directory of ours by pid can only be a leftover of an earlier process with this pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let owner = Ownership {
            dir,
            record: Mutex::new(Record {
                pid,
                start_time: procfs::start_time(pid).unwrap_or_default(),
                ..Record::default()
            }),
        };
        owner.save();
        Ok(owner)
    }

    /// The lab's own directory (certificates, logs, run directories).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn process(&self, name: &str, pid: u32) {
        let start_time = procfs::start_time(pid).unwrap_or_default();
        self.update(|r| {
            r.processes.push(OwnedProcess {
                name: name.into(),
                pid,
                start_time,
            })
        });
    }

    pub fn namespace(&self, name: &str) {
        self.update(|r| r.namespaces.push(name.into()));
    }

    pub fn directory(&self, path: &Path) {
        self.update(|r| r.dirs.push(path.to_path_buf()));
    }

    fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().expect("record lock"));
        self.save();
    }

    fn save(&self) {
        let text = serde_json::to_vec_pretty(&*self.record.lock().expect("record lock"))
            .expect("a record serialises");
        let tmp = self.dir.join(format!("{RECORD}.tmp"));
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, self.dir.join(RECORD)))
        {
            warn!(error = %e, dir = %self.dir.display(), "cannot write the lab's ownership record");
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let record = self.record.lock().expect("record lock");
        for d in &record.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes what labs whose process is gone left behind; returns one line per lab swept.
pub fn sweep() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(LAB_ROOT) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read(dir.join(RECORD)) else {
            continue;
        };
        let record: Record = match serde_json::from_slice(&text) {
            Ok(r) => r,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "unreadable lab record; leaving it");
                continue;
            }
        };
        if record.pid == std::process::id() || owns(record.pid, record.start_time) {
            continue; // a lab that is still running
        }
        let mut killed = 0;
        for p in &record.processes {
            if owns(p.pid, p.start_time) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed += 1;
            }
        }
        for ns in &record.namespaces {
            if Path::new("/var/run/netns").join(ns).exists() {
                tenet::testbed::delete_netns(ns);
            }
        }
        for d in &record.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&dir);
        let line = format!(
            "removed the lab left by process {}: {} processes killed, {} namespaces, {} directories",
            record.pid,
            killed,
            record.namespaces.len(),
            record.dirs.len() + 1
        );
        info!("{line}");
        swept.push(line);
    }
    swept
}

/// Whether `pid` is the very process that started at `start_time`.
fn owns(pid: u32, start_time: u64) -> bool {
    procfs::alive(pid) && procfs::start_time(pid) == Some(start_time)
}
