//! One host's BGP speaker: registers the host's BGP addresses, renders BIRD's configuration
//! from etcd, runs BIRD under [`crate::process`] and reconfigures it whenever an input key
//! changes — a new host, a peer, an AS number, a block affinity — without restarting anything.
//!
//! A new configuration goes through BIRD's own parse check (`bird -p -c`) before it replaces
//! the file BIRD reads; a rejected one is logged and the running configuration stays.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use super::BgpError;
use super::bird::{BirdOptions, render};
use super::control::BirdControl;
use super::model::{BgpModel, is_input_key};
use crate::calico::{Asn, BgpHostField, CalicoKey};
use crate::process::{Command, Daemon, DaemonSpec};
use crate::store::{Compare, Datastore, Revision, Txn, TxnOp};

/// Everything the speaker watches lives under it.
const WATCH_PREFIX: &str = "/calico/";

#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    /// The Calico host name (`/calico/bgp/v1/host/<host>`).
    pub host: String,
    /// The address BIRD peers from and its router id.
    pub ip_v4: Ipv4Addr,
    pub ip_v6: Option<Ipv6Addr>,
    /// This host's own AS number; `None` leaves the key alone (the global AS applies).
    pub as_num: Option<Asn>,
    /// The namespace BIRD runs in (`None`: the caller's).
    pub netns: Option<PathBuf>,
    /// BIRD's configuration, control socket, pid and log files.
    pub run_dir: PathBuf,
    /// The BIRD 2 program.
    pub bird: String,
    pub options: BirdOptions,
}

impl SpeakerConfig {
    pub fn new(host: &str, ip_v4: Ipv4Addr, run_dir: impl Into<PathBuf>) -> Self {
        SpeakerConfig {
            host: host.to_string(),
            ip_v4,
            ip_v6: None,
            as_num: None,
            netns: None,
            run_dir: run_dir.into(),
            bird: "bird".into(),
            options: BirdOptions::default(),
        }
    }

    pub fn config_file(&self) -> PathBuf {
        self.run_dir.join("bird.conf")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("bird.ctl")
    }
}

/// Writes the host's BGP registration as calico/node did at start: `ip_addr_v4` and
/// `ip_addr_v6` (always written, empty when unset — the templates expect both), `bird_ip`, the
/// host's metadata key if it is missing, and its AS number when one is given.
pub async fn register_host(
    store: &dyn Datastore,
    host: &str,
    ip_v4: Ipv4Addr,
    ip_v6: Option<Ipv6Addr>,
    as_num: Option<Asn>,
) -> Result<Revision, BgpError> {
    let field = |field| {
        CalicoKey::BgpHost {
            host: host.to_string(),
            field,
        }
        .path()
    };
    let metadata = CalicoKey::HostMetadata {
        host: host.to_string(),
    }
    .path();
    if store.get(&metadata).await?.is_none() {
        // Absent-compare so that a concurrent writer's metadata wins.
        let txn = Txn::new()
            .when(Compare::absent(metadata.clone()))
            .then(TxnOp::put(metadata, "{}"));
        let _ = store.txn_or_read(txn).await?;
    }
    let mut txn = Txn::new()
        .then(TxnOp::put(field(BgpHostField::IpAddrV4), ip_v4.to_string()))
        .then(TxnOp::put(
            field(BgpHostField::IpAddrV6),
            ip_v6.map(|a| a.to_string()).unwrap_or_default(),
        ))
        .then(TxnOp::put(
            CalicoKey::HostBirdIp {
                host: host.to_string(),
            }
            .path(),
            ip_v4.to_string(),
        ));
    if let Some(as_num) = as_num {
        txn = txn.then(TxnOp::put(field(BgpHostField::AsNum), as_num.to_string()));
    }
    Ok(store.txn(txn).await?)
}

/// A running speaker. [`BgpSpeaker::stop`] stops BIRD; dropping the handle leaves BIRD running
/// (with `persist`, its routes stay in the kernel) for the next agent to adopt.
pub struct BgpSpeaker {
    config: SpeakerConfig,
    daemon: Option<Daemon>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    applied: watch::Receiver<Revision>,
}

impl BgpSpeaker {
    /// Registers the host, renders and checks the first configuration, starts (or adopts)
    /// BIRD and follows etcd from then on.
    pub async fn start(
        store: Arc<dyn Datastore>,
        config: SpeakerConfig,
    ) -> Result<BgpSpeaker, BgpError> {
        let span = info_span!("bgp", host = %config.host);
        async {
            std::fs::create_dir_all(&config.run_dir).map_err(|source| BgpError::File {
                what: "BIRD run directory",
                path: config.run_dir.clone(),
                source,
            })?;
            register_host(
                store.as_ref(),
                &config.host,
                config.ip_v4,
                config.ip_v6,
                config.as_num,
            )
            .await?;
            let (model, revision) = BgpModel::load(store.as_ref(), &config.host).await?;
            let text = render(&model, &config.options)?;
            install(&config, &text).await?;
            let spec = DaemonSpec::new("bird", config.bird.clone())
                .args([
                    "-f".to_string(),
                    "-c".into(),
                    config.config_file().display().to_string(),
                    "-s".into(),
                    config.control_socket().display().to_string(),
                ])
                .netns(config.netns.as_deref())
                .run_dir(config.run_dir.clone());
            let daemon = Daemon::start(spec).await?;
            let mut control =
                wait_for_control(&config.control_socket(), Duration::from_secs(10)).await?;
            if daemon.adopted() {
                // A BIRD a previous agent started may hold an older configuration.
                let result = control.configure().await?;
                info!(%result, "adopted BIRD reconfigured");
            }
            info!(
                pid = daemon.pid(),
                blocks = model.blocks.len(),
                hosts = model.hosts.len(),
                "BIRD running"
            );
            let (stop, stopped) = watch::channel(false);
            let (applied_tx, applied) = watch::channel(revision);
            let follower = Follower {
                store,
                config: config.clone(),
                rendered: text,
                applied: applied_tx,
            };
            let task = tokio::spawn(follower.run(revision, stopped).in_current_span());
            Ok(BgpSpeaker {
                config,
                daemon: Some(daemon),
                task,
                stop,
                applied,
            })
        }
        .instrument(span)
        .await
    }

    pub fn config(&self) -> &SpeakerConfig {
        &self.config
    }

    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// Waits until BIRD's configuration reflects every change up to `revision`.
    pub async fn wait_applied(&mut self, revision: Revision) {
        let _ = self.applied.wait_for(|r| *r >= revision).await;
    }

    /// A control connection to this speaker's BIRD.
    pub async fn control(&self) -> Result<BirdControl, BgpError> {
        BirdControl::connect(&self.config.control_socket()).await
    }

    /// Stops following etcd and stops BIRD (SIGTERM: it closes its sessions with a
    /// notification, so peers withdraw this host's routes at once).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await;
        }
        info!(host = %self.config.host, "BGP speaker stopped");
    }
}

/// Writes `text` as BIRD's configuration after BIRD's own parse check of it.
async fn install(config: &SpeakerConfig, text: &str) -> Result<(), BgpError> {
    let target = config.config_file();
    let candidate = config.run_dir.join("bird.conf.new");
    let file_error = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BgpError::File { what, path, source }
    };
    std::fs::write(&candidate, text).map_err(file_error("BIRD configuration", &candidate))?;
    let check = Command::new(config.bird.clone())
        .args(["-p", "-c"])
        .arg(candidate.display().to_string())
        .run()
        .await;
    if let Err(e) = check {
        return Err(BgpError::ConfigRejected {
            path: candidate,
            message: e.to_string(),
        });
    }
    std::fs::rename(&candidate, &target).map_err(file_error("BIRD configuration", &target))
}

/// Connects to BIRD's control socket once BIRD has made it.
async fn wait_for_control(path: &Path, timeout: Duration) -> Result<BirdControl, BgpError> {
    let deadline = Instant::now() + timeout;
    loop {
        match BirdControl::connect(path).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The task that keeps BIRD's configuration in step with etcd.
struct Follower {
    store: Arc<dyn Datastore>,
    config: SpeakerConfig,
    /// The configuration BIRD runs with.
    rendered: String,
    applied: watch::Sender<Revision>,
}

impl Follower {
    async fn run(mut self, mut revision: Revision, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let session = self.follow(revision);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                result = session => {
                    let e = match result {
                        Ok(()) => "the watch ended".to_string(),
                        Err(e) => e.to_string(),
                    };
                    warn!(error = %e, retry_in = ?backoff, "BGP watch lost; reading etcd again");
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match self.refresh("resync").await {
                Ok(r) => {
                    revision = r;
                    backoff = Duration::from_millis(200);
                }
                Err(e) => warn!(error = %e, "BGP resync failed"),
            }
        }
    }

    /// Watches from `revision` until the watch fails.
    async fn follow(&mut self, revision: Revision) -> Result<(), BgpError> {
        let mut watch = self.store.watch(WATCH_PREFIX, revision + 1).await?;
        while let Some(event) = watch.next().await {
            let mut batch = vec![event?];
            // Everything already queued goes into the same reconfiguration.
            while let Some(Some(more)) = watch.next().now_or_never() {
                batch.push(more?);
            }
            let last = batch.last().map_or(revision, |e| e.revision);
            let relevant: Vec<&str> = batch
                .iter()
                .filter(|e| is_input_key(&e.key, &self.config.host))
                .map(|e| e.key.as_str())
                .collect();
            if !relevant.is_empty() {
                debug!(keys = ?relevant, "BGP input changed");
                match self.refresh("etcd change").await {
                    Ok(_) => {}
                    // The datastore failing is the watch's problem: resync.
                    Err(e @ BgpError::Store(_)) => return Err(e),
                    Err(e) => {
                        warn!(error = %e, "BIRD not reconfigured; it keeps its running configuration")
                    }
                }
            }
            self.applied.send_replace(last);
        }
        Ok(())
    }

    /// Reloads the model and reconfigures BIRD if the rendering changed. Returns the revision
    /// the model was read at.
    async fn refresh(&mut self, reason: &str) -> Result<Revision, BgpError> {
        let (model, revision) = BgpModel::load(self.store.as_ref(), &self.config.host).await?;
        let text = render(&model, &self.config.options)?;
        if text != self.rendered {
            let started = Instant::now();
            install(&self.config, &text).await?;
            let mut control = BirdControl::connect(&self.config.control_socket()).await?;
            let result = control.configure().await?;
            self.rendered = text;
            info!(
                reason,
                %result,
                blocks = model.blocks.len(),
                hosts = model.hosts.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "BIRD reconfigured"
            );
        }
        self.applied.send_replace(revision);
        Ok(revision)
    }
}
