//! A real multi-member etcd cluster (Debian etcd-server) on loopback ports, for the tests
//! that must survive a leader change, a member restart or a lost quorum.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tracing::info;

use super::etcd::free_port;
use super::{TestbedError, TestbedResult, io_err};
use crate::store::{Datastore, EtcdOptions, EtcdStore};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// `n` etcd members forming one cluster. Dropping it kills them and removes their data.
/// Elections are tuned fast (heartbeat 50 ms, election timeout 500 ms) so a test sees a new
/// leader within about a second.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: TempDir,
}

impl EtcdCluster {
    pub async fn start(n: usize) -> TestbedResult<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tenet-etcd-cluster-")
            .tempdir()
            .map_err(io_err("cannot create the cluster's directory"))?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let mut cluster = EtcdCluster { members, dir };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_ready().await?;
        info!(members = n, endpoints = ?cluster.endpoints(), "etcd cluster ready");
        Ok(cluster)
    }

    /// Every member's client URL, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// A store that knows every member (the client fails over between them).
    pub async fn store(&self) -> TestbedResult<EtcdStore> {
        self.store_with(EtcdOptions::default()).await
    }

    pub async fn store_with(&self, options: EtcdOptions) -> TestbedResult<EtcdStore> {
        EtcdStore::connect(&self.endpoints(), options)
            .await
            .map_err(|e| TestbedError::Io {
                what: "cannot connect to the etcd cluster".into(),
                source: std::io::Error::other(e),
            })
    }

    fn spawn(&mut self, i: usize) -> TestbedResult<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let m = &self.members[i];
        let log_path = self.dir.path().join(format!("{}.log", m.name));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot open an etcd member's log"))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("cannot open an etcd member's log"))?;
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "tenet-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(
                "cannot start `etcd` (is Debian's etcd-server installed?)",
            ))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until the running members serve a read that needs quorum.
    async fn wait_ready(&mut self) -> TestbedResult<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let options = EtcdOptions {
            request_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(200),
            ..EtcdOptions::default()
        };
        loop {
            if let Ok(store) = EtcdStore::connect(&self.running_endpoints(), options.clone()).await
                && store.revision().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestbedError::EtcdNotReady {
                    endpoint: self.endpoints().join(","),
                    seconds: READY_TIMEOUT.as_secs(),
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn running_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect()
    }

    /// Kills member `i` (SIGKILL: a crash), keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
            info!(member = %self.members[i].name, "etcd member killed");
        }
    }

    /// Starts member `i` again on its data. Returns once it runs (not waiting for quorum:
    /// with a majority down, quorum needs more than this member).
    pub fn restart(&mut self, i: usize) -> TestbedResult<()> {
        if self.members[i].child.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// Waits until the running members have quorum again.
    pub async fn wait_quorum(&mut self) -> TestbedResult<()> {
        self.wait_ready().await
    }

    /// The index of the current leader, asked of the running members (`etcdctl endpoint
    /// status`); `None` while there is none.
    pub fn leader(&self) -> Option<usize> {
        let endpoints = self.running_endpoints();
        if endpoints.is_empty() {
            return None;
        }
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoints.join(","),
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .args(["--command-timeout", "2s"])
            .output()
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let leader_of = statuses.as_array()?.iter().find_map(|s| {
            let status = &s["Status"];
            let member = status["header"]["member_id"].as_u64()?;
            let leader = status["leader"].as_u64()?;
            (member == leader).then(|| s["Endpoint"].as_str().map(str::to_string))?
        })?;
        self.members
            .iter()
            .position(|m| m.client_url() == leader_of)
    }

    /// The directory holding every member's data and log.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
