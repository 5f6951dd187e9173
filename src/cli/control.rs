//! The controller's commands: they connect to the scheduler with a certificate holding the
//! controller role, send one SSNTP command, and wait for its answer. ciao's scheduler (and
//! tenet's) obeys only the master controller — the first connected — so run them where no
//! other controller is connected, or they are dropped (the wait then times out and says so).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use ipnetwork::Ipv4Network;
use ssntp::payload::{
    AssignPublicIp, CnciPeer, CnciRefresh, CnciRefreshCommand, Delete, DeleteFailure, Payload,
    PublicIpAssigned, PublicIpCommand, PublicIpEvent, PublicIpFailure, PublicIpUnassigned,
    ReleasePublicIp, Start, StartCommand, StartFailure, StartRequirements, StopCommand,
    VnicNetworking,
};
use ssntp::{
    Client, ClientConfig, ClientEvent, Command, ErrorCode, Event, Frame, Identity, Operation, Role,
    TlsFiles, Uuid,
};

use super::CliError;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Scheduler address host:port.
    #[arg(long, global = true, env = "TENET_SCHEDULER", value_name = "HOST:PORT")]
    scheduler: Option<String>,
    /// PEM file with a certificate holding the controller role, and its key.
    #[arg(
        long,
        global = true,
        env = "TENET_CONTROLLER_CERT",
        value_name = "FILE"
    )]
    cert: Option<PathBuf>,
    /// PEM file with the CA certificate.
    #[arg(long, global = true, env = "TENET_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, global = true, default_value_t = 20)]
    wait: u64,
    /// Accept a ciao-made scheduler certificate (see tenet-scheduler --help).
    #[arg(long, global = true, env = "TENET_CIAO_COMPAT_CERTS")]
    ciao_compat_certs: bool,
}

#[derive(Debug, Args)]
pub struct InstanceArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(subcommand)]
    command: InstanceCommand,
}

#[derive(Debug, Subcommand)]
enum InstanceCommand {
    /// Start an instance's VNIC on a compute node (ciao's START): the node allocates its
    /// address (unless --ip), creates the VNIC (in --netns for a container), writes its
    /// endpoint and tells the concentrator. Prints the instance UUID; fails with the node's
    /// reason (StartFailure).
    Start {
        /// The tenant (ciao's tenant UUID, or any id).
        #[arg(long)]
        tenant: String,
        /// The tenant subnet (CIDR).
        #[arg(long)]
        subnet: Ipv4Network,
        /// The subnet's concentrator: its UUID and tunnel address.
        #[arg(long)]
        concentrator: String,
        #[arg(long)]
        concentrator_ip: Ipv4Addr,
        /// The instance UUID (default: a new one, printed).
        #[arg(long)]
        instance: Option<Uuid>,
        /// The VNIC UUID (default: a new one).
        #[arg(long)]
        vnic: Option<Uuid>,
        /// The VNIC's MAC (default: derived from the VNIC UUID).
        #[arg(long)]
        mac: Option<String>,
        /// The private address (default: the next free one of the subnet).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// A container workload's network namespace (path): its VNIC goes there.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Place it on a network node rather than a compute node.
        #[arg(long)]
        network_node: bool,
    },
    /// Delete an instance's VNICs, endpoints and addresses on its node (ciao's DELETE).
    Delete {
        /// The instance UUID.
        #[arg(long)]
        instance: String,
        /// The node it runs on (its SSNTP UUID; `tenet status` shows it).
        #[arg(long)]
        node: Uuid,
    },
}

#[derive(Debug, Args)]
pub struct PublicIpArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(subcommand)]
    command: PublicIpAction,
}

#[derive(Debug, Subcommand)]
enum PublicIpAction {
    /// Map a public address 1:1 to a workload's private address on its concentrator.
    Assign {
        #[arg(long)]
        concentrator: Uuid,
        #[arg(long)]
        public: Ipv4Addr,
        #[arg(long)]
        private: Ipv4Addr,
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        instance: String,
    },
    /// Remove a public address's mapping.
    Release {
        #[arg(long)]
        concentrator: Uuid,
        #[arg(long)]
        public: Ipv4Addr,
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        instance: String,
    },
}

#[derive(Debug, Args)]
pub struct CnciArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(subcommand)]
    command: CnciAction,
}

#[derive(Debug, Subcommand)]
enum CnciAction {
    /// Send a concentrator its tenant mesh (ciao's RefreshCNCI): every concentrator of the
    /// tenant, itself included, as PHYSICAL_IP=SUBNET[,TUNNEL_IP] (one per subnet).
    Refresh {
        #[arg(long)]
        concentrator: Uuid,
        #[arg(
            long = "peer",
            value_name = "PHYSICAL_IP=SUBNET[,TUNNEL_IP]",
            required = true
        )]
        peers: Vec<String>,
    },
}

/// A controller session: one command's, or the lab's.
pub(crate) struct Session {
    client: Client,
    events: tokio::sync::mpsc::Receiver<ClientEvent>,
    pub(crate) wait: Duration,
}

impl Session {
    async fn open(args: &ControllerArgs) -> anyhow::Result<Session> {
        let (Some(scheduler), Some(cert), Some(ca)) = (&args.scheduler, &args.cert, &args.ca)
        else {
            bail!(
                "--scheduler, --cert and --ca are required (or TENET_SCHEDULER, TENET_CONTROLLER_CERT, TENET_CA)"
            );
        };
        let identity = Identity::load(&TlsFiles {
            cert: cert.clone(),
            ca: ca.clone(),
        })?
        .with_ciao_compat(args.ciao_compat_certs);
        if !identity.roles().contains(Role::CONTROLLER) {
            bail!(
                "{} holds roles {} but not controller; issue one with --role controller",
                cert.display(),
                identity.roles()
            );
        }
        Session::connect(scheduler, identity, Duration::from_secs(args.wait)).await
    }

    /// A controller session to `scheduler` with `identity` (which must hold the controller
    /// role); each later wait for an answer gives up after `wait`.
    pub(crate) async fn connect(
        scheduler: &str,
        identity: Identity,
        wait: Duration,
    ) -> anyhow::Result<Session> {
        let mut config = ClientConfig::new(vec![scheduler.to_string()], identity, Uuid::new_v4());
        config.role = Some(Role::CONTROLLER);
        let (client, events) = Client::start(config)?;
        let mut s = Session {
            client,
            events,
            wait,
        };
        s.until(|e| matches!(e, ClientEvent::Connected(_)).then_some(()))
            .await
            .with_context(|| format!("connecting to the scheduler at {scheduler}"))?;
        Ok(s)
    }

    /// Waits for the first event `pick` accepts.
    pub(crate) async fn until<T>(
        &mut self,
        mut pick: impl FnMut(&ClientEvent) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => bail!(
                    "no answer within {} s (is another controller connected? the scheduler obeys only the first)",
                    self.wait.as_secs()
                ),
                Ok(None) => bail!("the SSNTP client stopped"),
                Ok(Some(ClientEvent::Stopped(Some(e)))) => return Err(e.into()),
                Ok(Some(e)) => {
                    if let Some(t) = pick(&e) {
                        return Ok(t);
                    }
                }
            }
        }
    }

    /// The next frame with one of `ops` for which `mine` holds.
    pub(crate) async fn answer(
        &mut self,
        ops: &[Operation],
        mine: impl Fn(&Frame) -> bool,
    ) -> anyhow::Result<Frame> {
        self.until(|e| match e {
            ClientEvent::Frame(f) if f.operation().is_some_and(|o| ops.contains(&o)) && mine(f) => {
                Some(f.clone())
            }
            _ => None,
        })
        .await
    }

    pub(crate) async fn send(&self, c: Command, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client.send_command(c, payload).await?;
        Ok(())
    }

    pub(crate) async fn close(self) {
        self.client.close().await;
    }
}

fn fail(e: anyhow::Error) -> CliError {
    CliError::Other(e)
}

pub async fn instance(args: &InstanceArgs) -> Result<ExitCode, CliError> {
    let mut s = Session::open(&args.controller).await.map_err(fail)?;
    let code = match &args.command {
        InstanceCommand::Start {
            tenant,
            subnet,
            concentrator,
            concentrator_ip,
            instance,
            vnic,
            mac,
            ip,
            netns,
            network_node,
        } => {
            let instance = instance.unwrap_or_else(Uuid::new_v4).to_string();
            let start = Start::from(StartCommand {
                instance_uuid: instance.clone(),
                tenant_uuid: tenant.clone(),
                vm_type: if netns.is_some() { "docker" } else { "qemu" }.into(),
                requirements: StartRequirements {
                    network_node: *network_node,
                    ..Default::default()
                },
                networking: VnicNetworking {
                    vnic_mac: mac.clone().unwrap_or_default(),
                    vnic_uuid: vnic.unwrap_or_else(Uuid::new_v4).to_string(),
                    concentrator_uuid: concentrator.clone(),
                    concentrator_ip: concentrator_ip.to_string(),
                    subnet: subnet.to_string(),
                    private_ip: ip.map(|i| i.to_string()).unwrap_or_default(),
                    netns: netns
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    ..Default::default()
                },
            });
            s.send(Command::Start, start.to_yaml())
                .await
                .map_err(fail)?;
            // ciao's nodes answer a START only when it fails; no failure within the wait
            // is success, which the endpoint in etcd (`tenet dump /calico/v1/host`) shows.
            let quiet = s.wait.min(Duration::from_secs(3));
            let failed = tokio::time::timeout(
                quiet,
                s.answer(&[Operation::Error(ErrorCode::StartFailure)], |f| {
                    StartFailure::from_yaml(&f.payload).is_ok_and(|p| p.instance_uuid == instance)
                }),
            )
            .await;
            match failed {
                Ok(Ok(f)) => {
                    let f = StartFailure::from_yaml(&f.payload).map_err(|e| fail(e.into()))?;
                    eprintln!(
                        "tenet: START of {instance} failed: {:?}: {}",
                        f.reason, f.detail
                    );
                    ExitCode::from(1)
                }
                _ => {
                    println!("{instance}");
                    ExitCode::SUCCESS
                }
            }
        }
        InstanceCommand::Delete { instance, node } => {
            let delete = Delete::from(StopCommand {
                instance_uuid: instance.clone(),
                workload_agent_uuid: node.to_string(),
                migration: false,
            });
            s.send(Command::Delete, delete.to_yaml())
                .await
                .map_err(fail)?;
            let f = s
                .answer(
                    &[
                        Operation::Event(Event::InstanceDeleted),
                        Operation::Error(ErrorCode::DeleteFailure),
                    ],
                    |f| String::from_utf8_lossy(&f.payload).contains(instance.as_str()),
                )
                .await
                .map_err(fail)?;
            if f.operation() == Some(Operation::Error(ErrorCode::DeleteFailure)) {
                let d = DeleteFailure::from_yaml(&f.payload).map_err(|e| fail(e.into()))?;
                eprintln!(
                    "tenet: DELETE of {instance} failed: {:?}: {}",
                    d.reason, d.detail
                );
                ExitCode::from(1)
            } else {
                println!("deleted {instance}");
                ExitCode::SUCCESS
            }
        }
    };
    s.close().await;
    Ok(code)
}

pub async fn public_ip(args: &PublicIpArgs) -> Result<ExitCode, CliError> {
    let mut s = Session::open(&args.controller).await.map_err(fail)?;
    let (assign, concentrator, public, private, tenant, instance) = match &args.command {
        PublicIpAction::Assign {
            concentrator,
            public,
            private,
            tenant,
            instance,
        } => (true, concentrator, public, Some(private), tenant, instance),
        PublicIpAction::Release {
            concentrator,
            public,
            tenant,
            instance,
        } => (false, concentrator, public, None, tenant, instance),
    };
    let cmd = PublicIpCommand {
        concentrator_uuid: concentrator.to_string(),
        tenant_uuid: tenant.clone(),
        instance_uuid: instance.clone(),
        public_ip: public.to_string(),
        private_ip: private.map(|p| p.to_string()).unwrap_or_default(),
        vnic_mac: String::new(),
    };
    let (command, payload, ok, err) = if assign {
        (
            Command::AssignPublicIp,
            AssignPublicIp::from(cmd).to_yaml(),
            Event::PublicIpAssigned,
            ErrorCode::AssignPublicIpFailure,
        )
    } else {
        (
            Command::ReleasePublicIp,
            ReleasePublicIp::from(cmd).to_yaml(),
            Event::PublicIpUnassigned,
            ErrorCode::UnassignPublicIpFailure,
        )
    };
    s.send(command, payload).await.map_err(fail)?;
    let public_text = public.to_string();
    let f = s
        .answer(&[Operation::Event(ok), Operation::Error(err)], |f| {
            let from_ok = |e: PublicIpEvent| e.public_ip == public_text;
            match f.operation() {
                Some(Operation::Error(_)) => {
                    PublicIpFailure::from_yaml(&f.payload).is_ok_and(|p| p.public_ip == public_text)
                }
                _ if assign => PublicIpAssigned::from_yaml(&f.payload)
                    .is_ok_and(|p| from_ok(p.public_ip_assigned)),
                _ => PublicIpUnassigned::from_yaml(&f.payload)
                    .is_ok_and(|p| from_ok(p.public_ip_unassigned)),
            }
        })
        .await
        .map_err(fail)?;
    s.close().await;
    if f.operation() == Some(Operation::Error(err)) {
        let p = PublicIpFailure::from_yaml(&f.payload).map_err(|e| fail(e.into()))?;
        eprintln!("tenet: {public}: {:?}", p.reason);
        return Ok(ExitCode::from(1));
    }
    match private {
        Some(p) => println!("{public} -> {p}"),
        None => println!("{public} released"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `PHYSICAL_IP=SUBNET[,TUNNEL_IP]`.
fn parse_peer(text: &str) -> anyhow::Result<CnciPeer> {
    let (physical, rest) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("--peer {text:?}: want PHYSICAL_IP=SUBNET[,TUNNEL_IP]"))?;
    let (subnet, tunnel) = rest.split_once(',').unwrap_or((rest, ""));
    physical
        .parse::<Ipv4Addr>()
        .map_err(|_| anyhow!("--peer {text:?}: {physical:?} is not an IPv4 address"))?;
    subnet
        .parse::<Ipv4Network>()
        .map_err(|_| anyhow!("--peer {text:?}: {subnet:?} is not an IPv4 CIDR"))?;
    if !tunnel.is_empty() {
        tunnel
            .parse::<Ipv4Addr>()
            .map_err(|_| anyhow!("--peer {text:?}: {tunnel:?} is not an IPv4 address"))?;
    }
    Ok(CnciPeer {
        physical_ip: physical.into(),
        subnet: subnet.into(),
        tunnel_ip: tunnel.into(),
        tunnel_id: 0,
    })
}

pub async fn cnci(args: &CnciArgs) -> Result<ExitCode, CliError> {
    let CnciAction::Refresh {
        concentrator,
        peers,
    } = &args.command;
    let cncis = peers
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(fail)?;
    let s = Session::open(&args.controller).await.map_err(fail)?;
    let refresh = CnciRefresh::from(CnciRefreshCommand {
        cnci_uuid: concentrator.to_string(),
        cncis,
    });
    s.send(Command::RefreshCnci, refresh.to_yaml())
        .await
        .map_err(fail)?;
    // RefreshCNCI has no answer in ciao's protocol; the concentrator logs what it did.
    s.close().await;
    println!("RefreshCNCI sent to {concentrator}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_ones_are_named() {
        let p = parse_peer("10.254.0.2=172.16.0.0/24,192.168.128.1").unwrap();
        assert_eq!(p.tunnel_ip, "192.168.128.1");
        assert!(
            parse_peer("10.254.0.2=172.16.0.0/24")
                .unwrap()
                .tunnel_ip
                .is_empty()
        );
        for bad in [
            "10.254.0.2",
            "x=172.16.0.0/24",
            "10.254.0.2=nope",
            "10.254.0.2=172.16.0.0/24,y",
        ] {
            assert!(
                parse_peer(bad).unwrap_err().to_string().contains("--peer"),
                "{bad}"
            );
        }
    }
}
