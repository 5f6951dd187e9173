//! Building the lab: etcd, certificates, the scheduler, the fabric with its compute and
//! concentrator hosts and the internet, the agents (real binaries), then the workloads a
//! controller starts through the scheduler, their leases and floating IPs.
//!
//! Everything is held by a guard, so an error (or Ctrl-C) at any step drops what was made in
//! reverse order: agents first, then namespaces, then etcd.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ipnetwork::{IpNetwork, Ipv4Network};
use ssntp::cert::{self, CertRequest};
use ssntp::payload::{
    AssignPublicIp, ConcentratorInstanceAdded, NodeConnected, Payload, PublicIpAssigned,
    PublicIpCommand, PublicIpFailure, Start, StartCommand, StartFailure, VnicNetworking,
};
use ssntp::{ClientEvent, Command, ErrorCode, Event, Identity, Operation, Role, Uuid};
use tenet::calico::{CalicoKey, HOSTS, WorkloadEndpoint, ensure_initialized};
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Host, Netns};
use tenet::types::gateway_of;

use super::owner::Ownership;
use super::probe::{DhcpClient, Lease};
use super::procs::{Daemon, binary};
use super::report::*;
use crate::cli::control::Session;

/// Every tenant's subnet: the same, on purpose — tenants overlap and must stay apart (see
/// [`Plan::subnet`] for the one exception).
pub const TENANT_SUBNET: &str = "172.16.0.0/24";
/// A tenant of the lab and the addresses the lab gives it.
pub struct LabTenant {
    pub name: &'static str,
    /// Its concentrator's uplink address.
    pub uplink: Ipv4Addr,
    /// The floating IP of its first workload.
    pub floating: Ipv4Addr,
    /// The host part of an address only its first workload holds (see the isolation check).
    pub canary: u32,
}

pub const TENANTS: [LabTenant; 2] = [
    LabTenant {
        name: "acme",
        uplink: Ipv4Addr::new(192, 0, 2, 11),
        floating: Ipv4Addr::new(192, 0, 2, 101),
        canary: 201,
    },
    LabTenant {
        name: "globex",
        uplink: Ipv4Addr::new(192, 0, 2, 12),
        floating: Ipv4Addr::new(192, 0, 2, 102),
        canary: 202,
    },
];
const INTERNET: &str = "192.0.2.0/24";
const EXTERNAL_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UNDERLAY: &str = "10.254.0.0/24";
/// How long agents and the scheduler get to come up, and a START to show its endpoint.
const WAIT: Duration = Duration::from_secs(30);

/// What to build.
#[derive(Clone, Debug)]
pub struct Plan {
    pub compute_hosts: usize,
    /// Workloads per tenant.
    pub workloads: usize,
    pub tunnel: BackendChoice,
    /// Whether the compute nodes enforce Calico policy (`tenet-cn --policy`).
    pub policy: bool,
    /// Routed mode: no concentrators or tunnels; the compute nodes route their workloads and
    /// exchange routes by BGP (`tenet-cn --mode routed`), with an upstream router as every
    /// host's default gateway.
    pub routed: bool,
    /// Each compute node also serves Docker's network and IPAM driver, as
    /// `/run/docker/plugins/tenet-lab<pid>-<host>.sock` (`tenet-cn --docker-socket`).
    pub docker: bool,
}

/// Where dockerd looks for plugin sockets (whatever its --exec-root).
pub const DOCKER_PLUGINS: &str = "/run/docker/plugins";

impl Plan {
    /// Tenant `i`'s subnet: the same for all — except over VXLAN, whose VNI is the subnet's
    /// key: two tenants with one subnet on one host would need one VNI twice, which the
    /// kernel refuses (EEXIST), so there tenant `i` gets 172.16.`i`.0/24.
    pub fn subnet(&self, i: usize) -> Ipv4Network {
        let overlap: Ipv4Network = TENANT_SUBNET.parse().expect("a valid subnet");
        if self.tunnel != BackendChoice::Vxlan {
            return overlap;
        }
        let [a, b, _, d] = overlap.network().octets();
        Ipv4Network::new(Ipv4Addr::new(a, b, i as u8, d), overlap.prefix()).expect("a /24")
    }
}

/// A running lab. Fields drop in this order: the controller, the agents, the scheduler, the
/// namespaces, etcd.
pub struct Lab {
    pub controller: Option<Session>,
    pub cn_agents: Vec<Daemon>,
    pub cnci_agents: Vec<Daemon>,
    pub scheduler: Daemon,
    _workload_ns: Vec<Netns>,
    pub internet: Netns,
    _conc_hosts: Vec<Host>,
    _cn_hosts: Vec<Host>,
    _fabric: Fabric,
    pub store: Arc<dyn Datastore>,
    _etcd: EtcdServer,
    _dhcp: DhcpClient,
    pub report: LabReport,
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

impl Lab {
    pub async fn build(plan: &Plan, owner: &Ownership, progress: &Progress) -> anyhow::Result<Lab> {
        let programs = [
            binary("tenet-scheduler")?,
            binary("tenet-cn")?,
            binary("tenet-cnci")?,
        ];
        let [scheduler_bin, cn_bin, cnci_bin] = programs;
        let logs = owner.dir().join("logs");
        std::fs::create_dir_all(&logs)?;

        let step = progress.step("etcd");
        let etcd = EtcdServer::start().await.context("cannot start etcd")?;
        owner.directory(etcd.dir());
        if let Some(pid) = etcd.pid() {
            owner.process("etcd", pid);
        }
        let store: Arc<dyn Datastore> =
            Arc::new(etcd.store().await.context("cannot connect to etcd")?);
        ensure_initialized(store.as_ref())
            .await
            .context("cannot initialise the Calico keyspace")?;
        step.done(&format!(
            "{} (Calico keyspace initialised)",
            etcd.endpoint()
        ));

        let step = progress.step("certificates");
        let pki = Pki::new(&owner.dir().join("pki"))?;
        step.done(&format!(
            "CA and role certificates in {}",
            pki.dir.display()
        ));

        let step = progress.step("tenet-scheduler");
        let address = format!("127.0.0.1:{}", free_port()?);
        let scheduler_metrics = loopback(free_port()?);
        let scheduler_cert = pki.issue(Role::SCHEDULER | Role::SERVER, "scheduler")?;
        let mut scheduler = Daemon::spawn(
            "tenet-scheduler",
            &scheduler_bin,
            vec![
                s("--listen"),
                address.clone(),
                s("--cert"),
                s(scheduler_cert.display()),
                s("--ca"),
                s(pki.ca.display()),
                s("--metrics-address"),
                s(scheduler_metrics),
            ],
            vec![(s("RUST_LOG"), s("info"))],
            logs.join("scheduler.log"),
        )?;
        owner.process("tenet-scheduler", scheduler.pid().unwrap_or_default());
        let controller_cert = pki.issue(Role::CONTROLLER, "controller")?;
        let mut controller = connect_controller(&address, &pki, &controller_cert, &mut scheduler)
            .await
            .context("the lab's controller cannot reach the scheduler")?;
        step.done(&format!("{address}; the lab is its controller"));

        let step = progress.step("fabric");
        let fabric = Fabric::new().await.context("cannot build the fabric")?;
        owner.namespace(fabric.netns().name());
        let mut cn_hosts = Vec::new();
        for i in 1..=plan.compute_hosts {
            let host = fabric.add_host(&format!("cn{i}")).await?;
            owner.namespace(host.name());
            cn_hosts.push(host);
        }
        let mut conc_hosts = Vec::new();
        let internet = Netns::create("internet")?;
        owner.namespace(internet.name());
        if plan.routed {
            // The upstream router: every compute host's default gateway (proxy ARP answers
            // for the workloads' gateway only on a host with a route to it).
            let upstream = fabric.add_host("upstream").await?;
            owner.namespace(upstream.name());
            for host in &cn_hosts {
                host.run(&["ip", "route", "add", "default", "via", &s(upstream.ip())])?;
            }
            step.done(&format!(
                "{} compute hosts and the upstream router {} on {UNDERLAY}",
                cn_hosts.len(),
                upstream.ip()
            ));
            conc_hosts.push(upstream);
        } else {
            for tenant in &TENANTS {
                let host = fabric.add_host(&format!("cnci-{}", tenant.name)).await?;
                owner.namespace(host.name());
                conc_hosts.push(host);
            }
            cable_internet(&internet, &conc_hosts)?;
            step.done(&format!(
                "{} compute hosts and {} concentrator hosts on {UNDERLAY}; internet {INTERNET}",
                cn_hosts.len(),
                conc_hosts.len()
            ));
        }
        if plan.routed {
            tenet::ipam::Ipam::new(store.clone())
                .create_pool(IpNetwork::V4(ROUTED_POOL.parse().expect("a CIDR")), false)
                .await
                .context("cannot create the routed pool")?;
        }

        let mut cnci_agents = Vec::new();
        let mut concentrators = Vec::new();
        let step = progress.step("concentrators (tenet-cnci)");
        let cnci_cert = pki.issue(Role::CNCIAGENT, "cnci")?;
        let conc_tenants = if plan.routed {
            &TENANTS[..0]
        } else {
            &TENANTS[..]
        };
        for (
            LabTenant {
                name: tenant,
                uplink,
                ..
            },
            host,
        ) in conc_tenants.iter().zip(&conc_hosts)
        {
            let uuid = Uuid::new_v4().to_string();
            let run_dir = owner.dir().join(format!("cnci-{tenant}"));
            let log = logs.join(format!("cnci-{tenant}.log"));
            let metrics = loopback(free_port()?);
            let agent = Daemon::spawn(
                &format!("tenet-cnci {tenant}"),
                &cnci_bin,
                [
                    agent_args(&address, &cnci_cert, &pki.ca, &uuid, host, plan.tunnel),
                    vec![
                        s("--tenant"),
                        s(tenant),
                        s("--uplink-net"),
                        s(INTERNET),
                        s("--run-dir"),
                        s(run_dir.display()),
                        s("--metrics-address"),
                        s(metrics),
                    ],
                ]
                .concat(),
                agent_env(&etcd),
                log.clone(),
            )?;
            owner.process(&agent.name, agent.pid().unwrap_or_default());
            cnci_agents.push(agent);
            concentrators.push(ConcentratorInfo {
                tenant: s(tenant),
                subnet: plan.subnet(concentrators.len()),
                uuid,
                netns: s(host.name()),
                underlay_ip: host.ip(),
                uplink_ip: *uplink,
                pid: cnci_agents.last().and_then(Daemon::pid),
                log,
                run_dir,
                metrics,
            });
        }
        let mut waiting: HashSet<String> = concentrators.iter().map(|c| c.uuid.clone()).collect();
        wait_agents(&mut controller, &mut cnci_agents, &mut waiting, |f| {
            (f.operation() == Some(Operation::Event(Event::ConcentratorInstanceAdded)))
                .then(|| ConcentratorInstanceAdded::from_yaml(&f.payload).ok())
                .flatten()
                .map(|p| p.concentrator_instance_added.instance_uuid)
        })
        .await
        .context("waiting for the concentrators to announce themselves")?;
        if plan.routed {
            step.done("none: routed mode has no concentrators");
        } else {
            step.done(&format!(
                "{} announced (ConcentratorInstanceAdded)",
                concentrators
                    .iter()
                    .map(|c| format!("{} at {}", c.tenant, c.underlay_ip))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }

        let step = progress.step("compute nodes (tenet-cn)");
        if plan.docker {
            // The plugin directory goes with the lab if the lab made it.
            for dir in [
                Path::new(DOCKER_PLUGINS).parent().expect("a parent"),
                Path::new(DOCKER_PLUGINS),
            ] {
                if !dir.exists() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    owner.directory(dir);
                }
            }
        }
        let cn_cert = pki.issue(Role::AGENT, "cn")?;
        let mut cn_agents = Vec::new();
        let mut compute_hosts = Vec::new();
        for (i, host) in cn_hosts.iter().enumerate() {
            let name = format!("cn-{}", i + 1);
            let uuid = Uuid::new_v4().to_string();
            let api_socket = owner.dir().join(format!("{name}.sock"));
            let metrics = loopback(free_port()?);
            let docker_socket = plan.docker.then(|| {
                PathBuf::from(DOCKER_PLUGINS)
                    .join(format!("tenet-lab{}-{name}.sock", std::process::id()))
            });
            let log = logs.join(format!("{name}.log"));
            let agent = Daemon::spawn(
                &format!("tenet-cn {name}"),
                &cn_bin,
                [
                    agent_args(&address, &cn_cert, &pki.ca, &uuid, host, plan.tunnel),
                    vec![
                        s("--host"),
                        name.clone(),
                        s("--api-socket"),
                        s(api_socket.display()),
                        s("--metrics-address"),
                        s(metrics),
                    ],
                    if plan.policy {
                        vec![s("--policy")]
                    } else {
                        vec![]
                    },
                    match &docker_socket {
                        Some(path) => vec![s("--docker-socket"), s(path.display())],
                        None => vec![],
                    },
                    if plan.routed {
                        vec![
                            s("--mode"),
                            s("routed"),
                            s("--bird-dir"),
                            s(owner.dir().join(format!("bird-{name}")).display()),
                            s("--bgp-hold-time"),
                            s(9),
                        ]
                    } else {
                        vec![]
                    },
                ]
                .concat(),
                agent_env(&etcd),
                log.clone(),
            )?;
            owner.process(&agent.name, agent.pid().unwrap_or_default());
            let bird_socket = plan
                .routed
                .then(|| owner.dir().join(format!("bird-{name}")).join("bird.ctl"));
            compute_hosts.push(ComputeHostInfo {
                name,
                uuid,
                netns: s(host.name()),
                underlay_ip: host.ip(),
                pid: agent.pid(),
                log,
                bird_socket,
                api_socket,
                docker_socket,
                metrics,
            });
            cn_agents.push(agent);
        }
        let mut waiting: HashSet<String> = compute_hosts.iter().map(|c| c.uuid.clone()).collect();
        wait_agents(&mut controller, &mut cn_agents, &mut waiting, |f| {
            (f.operation() == Some(Operation::Event(Event::NodeConnected)))
                .then(|| NodeConnected::from_yaml(&f.payload).ok())
                .flatten()
                .map(|p| p.node_connected.node_uuid)
        })
        .await
        .context("waiting for the compute nodes to connect")?;
        step.done(&format!(
            "{} connected (NodeConnected)",
            compute_hosts.len()
        ));

        // Workloads: a namespace each; the controller STARTs them, the scheduler places them.
        let step = progress.step("workloads (START)");
        let mut workload_ns = Vec::new();
        let mut pending = Vec::new();
        // Tenant by tenant, so that the scheduler's round robin spreads each tenant over
        // the hosts.
        let tenants: Vec<&str> = TENANTS.iter().map(|t| t.name).collect();
        for (t, tenant) in tenants.iter().enumerate() {
            for i in 0..plan.workloads {
                let name = format!("{tenant}-{}", i + 1);
                let ns = Netns::create(&name)?;
                owner.namespace(ns.name());
                let instance = Uuid::new_v4().to_string();
                let vnic = Uuid::new_v4().to_string();
                let payload = match concentrators.get(t) {
                    Some(conc) if !plan.routed => start_payload(&instance, &vnic, conc, &ns.path()),
                    _ => routed_start_payload(&instance, &vnic, tenant, &ns.path()),
                };
                controller.send(Command::Start, payload).await?;
                pending.push((name, t, instance, vnic, ns.name().to_string()));
                workload_ns.push(ns);
            }
        }
        let endpoints = wait_endpoints(
            &mut controller,
            store.as_ref(),
            &pending.iter().map(|p| p.2.clone()).collect::<Vec<_>>(),
            &step,
        )
        .await?;
        let mut workloads = Vec::new();
        for (name, t, instance, vnic, netns) in pending {
            let (host, ep) = &endpoints[&instance];
            let ip = ep
                .ipv4_nets
                .iter()
                .find_map(|n| match n.ip() {
                    IpAddr::V4(ip) => Some(ip),
                    _ => None,
                })
                .ok_or_else(|| anyhow!("the endpoint of {name} has no IPv4 address"))?;
            let (subnet, gateway) = match concentrators.get(t) {
                Some(c) => (s(c.subnet), gateway_of(&c.subnet)),
                None => (s(ROUTED_POOL), tenet::net::routed::GATEWAY_V4),
            };
            workloads.push(WorkloadInfo {
                name,
                tenant: s(tenants[t]),
                instance,
                vnic,
                netns,
                host: host.clone(),
                subnet,
                ip,
                gateway,
                mac: ep.mac.map(s).unwrap_or_default(),
                floating_ip: None,
            });
        }
        step.done(&format!(
            "{} started: {}",
            workloads.len(),
            workloads
                .iter()
                .map(|w| format!("{} on {}", w.name, w.host))
                .collect::<Vec<_>>()
                .join(", ")
        ));

        let dhcp = DhcpClient::new(&owner.dir().join("dhcp"))?;
        let mut checks = Vec::new();
        if plan.routed {
            let step = progress.step("addresses (set by tenet-cn)");
            for w in &workloads {
                checks.push(routed_address_check(w).await);
            }
            let ok = checks.iter().filter(|c| c.ok).count();
            step.done(&format!(
                "{ok} of {} workloads have their address",
                workloads.len()
            ));
        } else {
            let step = progress.step("DHCP over the tunnels");
            let leases = futures::future::join_all(
                workloads
                    .iter()
                    .map(|w| async { (w.name.clone(), dhcp.lease(&w.netns, 15).await) }),
            )
            .await;
            let mut lease_of: BTreeMap<String, anyhow::Result<Lease>> =
                leases.into_iter().collect();
            for w in &workloads {
                let (ok, detail) = match lease_of.remove(&w.name) {
                    Some(Ok(lease)) if lease.ip == w.ip && lease.router == w.gateway => (
                        true,
                        format!(
                            "{} via {} (mtu {})",
                            lease.ip,
                            lease.router,
                            lease.mtu.map(s).unwrap_or_else(|| s("-"))
                        ),
                    ),
                    Some(Ok(lease)) => (
                        false,
                        format!(
                            "leased {} via {}, but IPAM gave {} (gateway {})",
                            lease.ip, lease.router, w.ip, w.gateway
                        ),
                    ),
                    Some(Err(e)) => (false, format!("{e:#}")),
                    None => (false, s("no DHCP client ran")),
                };
                checks.push(Check {
                    workload: w.name.clone(),
                    kind: s("lease"),
                    ok,
                    detail,
                });
            }
            let leased = checks.iter().filter(|c| c.ok).count();
            if leased == workloads.len() {
                step.done(&format!("{leased} leases"));
            } else {
                step.done(&format!("{leased} of {} leases", workloads.len()));
            }
        }

        if !plan.routed {
            let step = progress.step("floating IPs (AssignPublicIP)");
            for (tenant, conc) in TENANTS.iter().zip(&concentrators) {
                let Some(w) = workloads.iter_mut().find(|w| w.tenant == conc.tenant) else {
                    continue;
                };
                let public = tenant.floating;
                assign_floating(&mut controller, conc, w, public).await?;
                w.floating_ip = Some(public);
            }
            step.done(
                &workloads
                    .iter()
                    .filter_map(|w| {
                        w.floating_ip
                            .map(|f| format!("{f} → {} ({})", w.ip, w.name))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }

        let report = LabReport {
            passed: false,
            ready_seconds: 0.0,
            tunnel: s(plan.tunnel),
            mode: s(if plan.routed { "routed" } else { "gre" }),
            etcd: EtcdInfo {
                endpoint: etcd.endpoint(),
                data_dir: etcd.data_dir(),
                pid: etcd.pid(),
            },
            scheduler: SchedulerInfo {
                address,
                pid: scheduler.pid(),
                log: scheduler.log.clone(),
                metrics: scheduler_metrics,
            },
            pki: PkiInfo {
                dir: pki.dir.clone(),
                ca: pki.ca.clone(),
                controller_cert,
            },
            fabric: FabricInfo {
                netns: s(fabric.netns().name()),
                underlay: s(UNDERLAY),
            },
            internet: InternetInfo {
                netns: s(internet.name()),
                network: s(INTERNET),
                external_ip: EXTERNAL_HOST,
            },
            compute_hosts,
            concentrators,
            workloads,
            checks,
        };
        Ok(Lab {
            controller: Some(controller),
            cn_agents,
            cnci_agents,
            scheduler,
            _workload_ns: workload_ns,
            internet,
            _conc_hosts: conc_hosts,
            _cn_hosts: cn_hosts,
            _fabric: fabric,
            store,
            _etcd: etcd,
            _dhcp: dhcp,
            report,
        })
    }

    /// Restarts a daemon that exited, as systemd would, so that a crash (`kill -9` of an
    /// agent or the scheduler) shows the recovery it is meant to show. Returns a line per
    /// restart; the report carries the new process ids.
    pub fn supervise(&mut self, owner: &Ownership) -> Vec<String> {
        let mut lines = Vec::new();
        let mut restart = |d: &mut Daemon, pid: &mut Option<u32>| {
            let Some(status) = d.exited() else {
                return;
            };
            let line = match d.start() {
                Ok(()) => {
                    *pid = d.pid();
                    owner.process(&d.name, pid.unwrap_or_default());
                    format!(
                        "{} exited ({status}); restarted as pid {}",
                        d.name,
                        pid.unwrap_or_default()
                    )
                }
                Err(e) => format!(
                    "{} exited ({status}) and cannot be restarted: {e:#}",
                    d.name
                ),
            };
            lines.push(line);
        };
        for (d, info) in self
            .cn_agents
            .iter_mut()
            .zip(&mut self.report.compute_hosts)
        {
            restart(d, &mut info.pid);
        }
        for (d, info) in self
            .cnci_agents
            .iter_mut()
            .zip(&mut self.report.concentrators)
        {
            restart(d, &mut info.pid);
        }
        restart(&mut self.scheduler, &mut self.report.scheduler.pid);
        lines
    }

    /// Stops the agents and the scheduler with SIGTERM (as an operator would), then removes
    /// every namespace and etcd with its data.
    pub async fn teardown(mut self) {
        if let Some(c) = self.controller.take() {
            c.close().await;
        }
        let grace = Duration::from_secs(5);
        futures::future::join_all(
            self.cn_agents
                .iter_mut()
                .chain(self.cnci_agents.iter_mut())
                .map(|a| a.stop(grace)),
        )
        .await;
        self.scheduler.stop(grace).await;
    }
}

/// The flags both agents take: scheduler, certificate, identity, host namespace, underlay,
/// tunnel backend, and a short status TTL (a crashed agent leaves `tenet status` soon).
fn agent_args(
    scheduler: &str,
    cert: &Path,
    ca: &Path,
    uuid: &str,
    host: &Host,
    tunnel: BackendChoice,
) -> Vec<String> {
    vec![
        s("run"),
        s("--server"),
        s(scheduler),
        s("--cert"),
        s(cert.display()),
        s("--ca"),
        s(ca.display()),
        s("--uuid"),
        s(uuid),
        s("--netns"),
        s(host.path().display()),
        s("--compute-net"),
        s(UNDERLAY),
        s("--tunnel"),
        s(tunnel),
        s("--status-ttl"),
        s(5),
    ]
}

fn agent_env(etcd: &EtcdServer) -> Vec<(String, String)> {
    vec![
        (s("ETCD_ENDPOINTS"), etcd.endpoint()),
        (s("RUST_LOG"), s("info")),
    ]
}

/// The pool routed workloads get their addresses from (a Calico pool; BIRD announces its
/// blocks).
pub const ROUTED_POOL: &str = "10.65.0.0/16";

/// A START for a routed node: the pool as its subnet, no concentrator.
fn routed_start_payload(instance: &str, vnic: &str, tenant: &str, netns: &Path) -> Vec<u8> {
    Start::from(StartCommand {
        instance_uuid: instance.into(),
        tenant_uuid: tenant.into(),
        vm_type: "docker".into(),
        networking: VnicNetworking {
            vnic_uuid: vnic.into(),
            subnet: ROUTED_POOL.into(),
            netns: netns.to_string_lossy().into_owned(),
            ..Default::default()
        },
        ..Default::default()
    })
    .to_yaml()
}

/// A routed workload's address is tenet-cn's doing (no DHCP): its eth0 must hold the
/// endpoint's address as a /32.
async fn routed_address_check(w: &WorkloadInfo) -> Check {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", &w.netns, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
        ])
        .output()
        .await;
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let want = format!("{}/32", w.ip);
    let ok = text.contains(&want);
    Check {
        workload: w.name.clone(),
        kind: s("address"),
        ok,
        detail: if ok {
            format!("{want} on eth0, default via {}", w.gateway)
        } else {
            format!("eth0 does not hold {want}: {}", text.trim())
        },
    }
}

fn start_payload(instance: &str, vnic: &str, conc: &ConcentratorInfo, netns: &Path) -> Vec<u8> {
    Start::from(StartCommand {
        instance_uuid: instance.into(),
        tenant_uuid: conc.tenant.clone(),
        vm_type: "docker".into(),
        networking: VnicNetworking {
            vnic_uuid: vnic.into(),
            concentrator_uuid: conc.uuid.clone(),
            concentrator_ip: conc.underlay_ip.to_string(),
            subnet: conc.subnet.to_string(),
            netns: netns.to_string_lossy().into_owned(),
            ..Default::default()
        },
        ..Default::default()
    })
    .to_yaml()
}

/// The lab's PKI: a CA and role certificates (certificate and key in one PEM file each).
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    ca_cert: cert::GeneratedCert,
}

impl Pki {
    fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca_cert = cert::generate_ca("tenet lab CA", "tenet lab", 2)?;
        let ca = dir.join("CAcert-lab.pem");
        std::fs::write(&ca, &ca_cert.cert_pem)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_cert,
        })
    }

    fn issue(&self, roles: Role, name: &str) -> anyhow::Result<PathBuf> {
        let req = CertRequest::new(
            roles,
            vec![s("localhost")],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        let c = cert::issue(&self.ca_cert.cert_pem, &self.ca_cert.key_pem, &req)?;
        let path = self.dir.join(format!("{name}.pem"));
        write_private(&path, c.bundle().as_bytes())?;
        Ok(path)
    }
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// A loopback address (for agents' metrics endpoints).
fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Connects the lab's controller, retrying while the scheduler starts.
async fn connect_controller(
    address: &str,
    pki: &Pki,
    cert: &Path,
    scheduler: &mut Daemon,
) -> anyhow::Result<Session> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        scheduler.check_running()?;
        let identity = Identity::load(&ssntp::TlsFiles {
            cert: cert.to_path_buf(),
            ca: pki.ca.clone(),
        })?;
        match Session::connect(address, identity, Duration::from_millis(500)).await {
            Ok(mut session) => {
                session.wait = WAIT;
                return Ok(session);
            }
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until `pick` has named every UUID in `waiting` (agents announcing themselves),
/// failing early with an agent's log if one exits.
async fn wait_agents(
    controller: &mut Session,
    agents: &mut [Daemon],
    waiting: &mut HashSet<String>,
    pick: impl Fn(&ssntp::Frame) -> Option<String>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !waiting.is_empty() {
        for a in agents.iter_mut() {
            a.check_running()?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} did not connect within {} s; see the agents' logs:\n{}",
                waiting.len(),
                WAIT.as_secs(),
                agents
                    .iter()
                    .map(|a| format!("--- {} ({})\n{}", a.name, a.log.display(), a.tail(10)))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let got = tokio::time::timeout(
            Duration::from_millis(200),
            controller.until(|e| match e {
                ClientEvent::Frame(f) => pick(f),
                _ => None,
            }),
        )
        .await;
        if let Ok(Ok(uuid)) = got {
            waiting.remove(&uuid);
        }
    }
    Ok(())
}

/// Waits for every instance's workload endpoint in etcd (the compute node's sign that the
/// START worked; ciao's nodes answer only failures), or a StartFailure. Returns, per instance,
/// the host it is on and its endpoint.
async fn wait_endpoints(
    controller: &mut Session,
    store: &dyn Datastore,
    instances: &[String],
    step: &Step,
) -> anyhow::Result<BTreeMap<String, (String, WorkloadEndpoint)>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let wanted: HashSet<&str> = instances.iter().map(String::as_str).collect();
    loop {
        let mut found = BTreeMap::new();
        for kv in store.list(HOSTS).await?.kvs {
            if let Ok(CalicoKey::WorkloadEndpoint(id)) = CalicoKey::parse(&kv.key)
                && wanted.contains(id.workload.as_str())
            {
                let ep: WorkloadEndpoint = serde_json::from_slice(&kv.value)
                    .with_context(|| format!("the endpoint at {} does not decode", kv.key))?;
                found.insert(id.workload.clone(), (id.host.clone(), ep));
            }
        }
        if found.len() == wanted.len() {
            return Ok(found);
        }
        step.update(&format!("{} of {} endpoints", found.len(), wanted.len()));
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {} workloads have an endpoint after {} s",
                found.len(),
                wanted.len(),
                WAIT.as_secs()
            );
        }
        let failed = tokio::time::timeout(
            Duration::from_millis(100),
            controller.answer(&[Operation::Error(ErrorCode::StartFailure)], |_| true),
        )
        .await;
        if let Ok(Ok(f)) = failed {
            let f = StartFailure::from_yaml(&f.payload)?;
            bail!(
                "START of {} failed: {:?}: {}",
                f.instance_uuid,
                f.reason,
                f.detail
            );
        }
    }
}

async fn assign_floating(
    controller: &mut Session,
    conc: &ConcentratorInfo,
    w: &WorkloadInfo,
    public: Ipv4Addr,
) -> anyhow::Result<()> {
    let cmd = PublicIpCommand {
        concentrator_uuid: conc.uuid.clone(),
        tenant_uuid: conc.tenant.clone(),
        instance_uuid: w.instance.clone(),
        public_ip: s(public),
        private_ip: s(w.ip),
        vnic_mac: w.mac.clone(),
    };
    controller
        .send(Command::AssignPublicIp, AssignPublicIp::from(cmd).to_yaml())
        .await?;
    let text = s(public);
    let f = controller
        .answer(
            &[
                Operation::Event(Event::PublicIpAssigned),
                Operation::Error(ErrorCode::AssignPublicIpFailure),
            ],
            |f| match f.operation() {
                Some(Operation::Error(_)) => {
                    PublicIpFailure::from_yaml(&f.payload).is_ok_and(|p| p.public_ip == text)
                }
                _ => PublicIpAssigned::from_yaml(&f.payload)
                    .is_ok_and(|p| p.public_ip_assigned.public_ip == text),
            },
        )
        .await?;
    if f.operation() == Some(Operation::Error(ErrorCode::AssignPublicIpFailure)) {
        let p = PublicIpFailure::from_yaml(&f.payload)?;
        bail!("AssignPublicIP {public} → {} failed: {:?}", w.ip, p.reason);
    }
    Ok(())
}

/// The internet: a bridge `inet0` in its own namespace, which is also the external host
/// (192.0.2.1); each concentrator host's uplink `up0` is cabled to it. No route leads out.
fn cable_internet(internet: &Netns, conc_hosts: &[Host]) -> anyhow::Result<()> {
    internet.run(&[
        "sh",
        "-c",
        "for t in iptables ip6tables arptables; do \
           f=/proc/sys/net/bridge/bridge-nf-call-$t; [ -e $f ] && echo 0 > $f; done; true",
    ])?;
    internet.run(&["ip", "link", "add", "inet0", "type", "bridge"])?;
    internet.run(&[
        "ip",
        "addr",
        "add",
        &format!("{EXTERNAL_HOST}/24"),
        "dev",
        "inet0",
    ])?;
    internet.run(&["ip", "link", "set", "inet0", "up"])?;
    for (i, (tenant, host)) in TENANTS.iter().zip(conc_hosts).enumerate() {
        let port = format!("i{}", i + 1);
        internet.run(&[
            "ip",
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            host.name(),
        ])?;
        internet.run(&["ip", "link", "set", &port, "master", "inet0", "up"])?;
        let addr = IpNetwork::V4(Ipv4Network::new(tenant.uplink, 24)?);
        host.run(&["ip", "addr", "add", &addr.to_string(), "dev", "up0"])?;
        host.run(&["ip", "link", "set", "up0", "up"])?;
    }
    Ok(())
}
