use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tracing::{debug, info};

use super::{TestbedError, TestbedResult, io_err};
use crate::store::{Datastore, EtcdOptions, EtcdStore, EtcdTls};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A real `etcd` (Debian etcd-server) on free loopback ports with a temporary data directory.
///
/// Dropping it kills the process and removes the directory. [`EtcdServer::stop`] and
/// [`EtcdServer::start_again`] simulate an outage: the data and ports are kept, so clients
/// and watches can resume.
pub struct EtcdServer {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdServerTls>,
}

/// A TLS-only etcd: its certificate (for 127.0.0.1), the CA clients must trust, and what
/// the testbed itself connects with.
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// The CA that signed the server's certificate and, with `client_cert_auth`, the
    /// clients' (`--trusted-ca-file`).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `--client-cert-auth`: clients must present a certificate signed by the CA.
    pub client_cert_auth: bool,
    /// The testbed's own client settings (readiness, [`EtcdServer::store`]).
    pub client: EtcdTls,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers requests.
    pub async fn start() -> TestbedResult<Self> {
        Self::start_with(None).await
    }

    /// Starts an etcd that speaks only TLS to clients.
    pub async fn start_tls(tls: EtcdServerTls) -> TestbedResult<Self> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<EtcdServerTls>) -> TestbedResult<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tenet-etcd-")
            .tempdir()
            .map_err(io_err("cannot create etcd data directory"))?;
        let mut server = Self {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            tls,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` for a TLS server).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client options the testbed connects with.
    pub fn client_options(&self) -> EtcdOptions {
        EtcdOptions {
            tls: self.tls.as_ref().map(|t| t.client.clone()),
            ..EtcdOptions::default()
        }
    }

    /// The temporary directory holding the data and the log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// A store connected to this server.
    pub async fn store(&self) -> TestbedResult<EtcdStore> {
        EtcdStore::connect(&[self.endpoint()], self.client_options())
            .await
            .map_err(|e| TestbedError::Io {
                what: format!("cannot connect to {}", self.endpoint()),
                source: std::io::Error::other(e),
            })
    }

    /// Starts the process (again) on the same ports and data, and waits until it is ready.
    pub async fn start_again(&mut self) -> TestbedResult<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let name = "tenet-test";
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("cannot open etcd log"))?;
        let log2 = log.try_clone().map_err(io_err("cannot open etcd log"))?;
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert_file),
                ("--key-file", &tls.key_file),
                ("--trusted-ca-file", &tls.ca_file),
            ] {
                tls_args.push(flag.into());
                tls_args.push(path.display().to_string());
            }
            if tls.client_cert_auth {
                tls_args.push("--client-cert-auth".into());
            }
        }
        let child = Command::new("etcd")
            .args(&tls_args)
            .arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("{name}={peer}"))
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(
                "cannot start `etcd` (is Debian's etcd-server installed?)",
            ))?;
        info!(pid = child.id(), endpoint = %client, "etcd started");
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> TestbedResult<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let options = EtcdOptions {
            request_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(200),
            ..self.client_options()
        };
        loop {
            if let Ok(store) = EtcdStore::connect(&[self.endpoint()], options.clone()).await
                && store.revision().await.is_ok()
            {
                return Ok(());
            }
            let exited = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.stop();
                return Err(TestbedError::EtcdNotReady {
                    endpoint: self.endpoint(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log: tail(&self.log_path(), 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process, keeping its data (an outage, or a crash: etcd's WAL makes
    /// committed writes durable either way).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            debug!(endpoint = %self.endpoint(), "etcd stopped");
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) fn free_port() -> TestbedResult<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("cannot find a free port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("cannot find a free port"))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
