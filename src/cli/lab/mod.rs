//! `tenet lab`: the whole multi-tenant cloud on one machine. etcd, tenet-scheduler, compute
//! hosts running the real `tenet-cn`, one concentrator per tenant running the real
//! `tenet-cnci`, and an internet with an external host, all network namespaces on a lab
//! fabric; the lab is the controller that starts the workloads of two tenants whose subnets
//! overlap, then proves with traffic that each workload leased its address over its tunnel,
//! reaches its gateway, its tenant, the internet (through NAT) and is reached at its floating
//! IP, and that the tenants cannot reach each other.

mod build;
mod checks;
mod owner;
mod probe;
mod procs;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tenet::net::tunnel::BackendChoice;

use super::CliError;
use build::{Lab, Plan};
use report::{LabReport, Progress};

#[derive(Debug, Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct LabArgs {
    /// Compute hosts, each running tenet-cn.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    cns: u16,
    /// Workloads per tenant (two tenants), spread over the compute hosts by the scheduler.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=50))]
    workloads: u16,
    /// Tunnel backend of every agent: auto (kernel gretap if this kernel has GRE, else the
    /// eBPF GRE datapath, else the user-space one), kernel, ebpf, userspace or vxlan.
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    tunnel: BackendChoice,
    /// Enforce Calico policy on the compute nodes (`tenet-cn --policy`): every VNIC gets its
    /// tenant's allow-all profile, so the checks still pass; add policies or tighten the
    /// profiles with `tenet apply` against the lab's etcd to see them bite.
    #[arg(long)]
    policy: bool,
    /// Networking mode: gre (bridges, tunnels, a concentrator per tenant; default) or routed
    /// (Calico's model: routed workloads, BGP between the compute hosts through BIRD, no
    /// concentrators or tunnels; needs Debian's `bird2`).
    #[arg(long, value_enum, default_value_t = LabMode::Gre)]
    mode: LabMode,
    /// Every compute node also serves Docker's network and IPAM driver, named
    /// tenet-lab<pid>-cn-N (its socket in /run/docker/plugins): a dockerd started inside a
    /// compute host's namespace (`ip netns exec …`) can then run containers on the tenants'
    /// networks (see `tenet-cn run --help`).
    #[arg(long)]
    docker: bool,
    /// Seconds to stay up after the checks, then tear down (0: build, check, tear down; the
    /// exit status is 1 if a check failed). Without it the lab runs until Ctrl-C or SIGTERM.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Write the lab's facts as JSON: namespaces, addresses, floating IPs, process ids,
    /// the etcd endpoint, the scheduler's address and the certificate paths.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write the live topology as Graphviz DOT once the checks ran (`dot -Tsvg FILE`
    /// renders it; `tenet status -o dot` gives the same from any running system).
    #[arg(long, value_name = "FILE")]
    graph: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LabMode {
    Gre,
    Routed,
}

const AFTER_HELP: &str = "\
What it builds (all network namespaces; nothing routes to the machine's own network):
  fabric      the underlay switch, 10.254.0.0/24
  cnN         compute hosts, each running `tenet-cn run --netns …`
  cnci-T      one concentrator host per tenant (acme, globex), running `tenet-cnci run`,
              with an uplink to the internet (192.0.2.11, .12)
  internet    the external network 192.0.2.0/24; the external host is 192.0.2.1
  T-N         workloads: the lab, as the controller, STARTs them through tenet-scheduler;
              both tenants use 172.16.0.0/24; each workload leases its address by DHCP
              over its tunnel (busybox udhcpc with the lab's own script)

Checks (each by real traffic; TCP probes on port 7777 are answered with the responder's
name, so a check knows who answered): lease, gateway, tenant (every workload of its tenant,
across hosts), internet (the external host sees the concentrator's uplink address: NAT),
floating_ip (192.0.2.101/.102 from the external host), isolation (no workload of the other
tenant answers, nor its canary address).

Routed mode (--mode routed): no concentrators or tunnels. An upstream router is every compute
host's default gateway; the workloads are containers that tenet-cn routes (a /32 each, from
the Calico pool 10.65.0.0/16, default route via 169.254.1.1 by proxy ARP), and BIRD on each
host announces its blocks to the others. Checks: address, host (the workload reaches its
host), tenant (every workload of its tenant, across hosts), bgp (every host's mesh sessions
are Established). Routed mode separates tenants by policy, not topology: there is no
isolation check, and `--policy` with tightened profiles is how tenants are kept apart.

Everything the lab makes is listed in /run/tenet/lab/<pid>/owner.json while it runs; a lab
that was killed is cleaned up by the next `tenet lab`.

Examples:
  tenet lab                              # build, check, stay up until Ctrl-C
  tenet lab --duration 0 --output lab.json --graph lab.dot
  tenet lab --cns 4 --workloads 4 --tunnel userspace
  tenet lab --mode routed --cns 3 --duration 0";

pub async fn run(args: &LabArgs) -> Result<ExitCode, CliError> {
    // Signals first: a Ctrl-C at any point must end in a clean teardown.
    let stop = tenet::process::terminated().context("cannot watch for Ctrl-C and SIGTERM")?;
    tokio::pin!(stop);
    if !nix::unistd::Uid::effective().is_root() {
        return Err(anyhow::anyhow!(
            "tenet lab must run as root: it creates network namespaces and starts agents"
        )
        .into());
    }
    for line in owner::sweep() {
        println!("lab: {line}");
    }
    let owner = owner::Ownership::claim()?;
    let progress = Progress::new();
    let plan = Plan {
        compute_hosts: args.cns.into(),
        workloads: args.workloads.into(),
        tunnel: args.tunnel,
        policy: args.policy,
        routed: args.mode == LabMode::Routed,
        docker: args.docker,
    };
    progress.say(&format!(
        "lab: {} compute hosts, 2 tenants × {} workloads, {}; files in {}",
        plan.compute_hosts,
        plan.workloads,
        if plan.routed {
            "routed (BGP through BIRD, no tunnels)".to_string()
        } else {
            format!("{} tunnels", plan.tunnel)
        },
        owner.dir().display()
    ));

    if plan.tunnel == BackendChoice::Vxlan {
        progress.say(&format!(
            "lab: VXLAN's VNI is the subnet's key, so overlapping tenants cannot share a host: \
             the tenants get {} and {}",
            plan.subnet(0),
            plan.subnet(1)
        ));
    }
    let mut lab = tokio::select! {
        built = Lab::build(&plan, &owner, &progress) => built.context("the lab could not be built (everything it made is removed)")?,
        () = &mut stop => {
            println!("lab: interrupted while building; everything it made is removed");
            return Ok(ExitCode::from(130));
        }
    };
    let responders = tokio::select! {
        r = checks::run(&mut lab, &progress) => r,
        () = &mut stop => {
            println!("lab: interrupted while checking; tearing down");
            lab.teardown().await;
            return Ok(ExitCode::from(130));
        }
    };
    let responders = match responders {
        Ok(r) => r,
        Err(e) => {
            lab.teardown().await;
            return Err(e.context("the checks could not run").into());
        }
    };
    lab.report.passed = lab.report.checks.iter().all(|c| c.ok);
    lab.report.ready_seconds = progress.elapsed().as_secs_f64();
    if let Some(c) = lab.controller.take() {
        // Hand the controller role to whoever wants it (`tenet instance …`).
        c.close().await;
    }
    println!();
    print!("{}", lab.report.table());
    println!();
    let failed = lab.report.checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        println!(
            "lab: ready in {:.1} s; all {} checks passed",
            lab.report.ready_seconds,
            lab.report.checks.len()
        );
    } else {
        println!(
            "lab: {failed} of {} checks FAILED (the logs are in {})",
            lab.report.checks.len(),
            owner.dir().join("logs").display()
        );
    }
    if let Some(path) = &args.output {
        write_output(path, &lab.report)?;
        println!("lab: facts written to {}", path.display());
    }
    if let Some(path) = &args.graph {
        write_graph(path, &lab).await?;
        println!(
            "lab: topology written to {} (render: dot -Tsvg)",
            path.display()
        );
    }

    let interrupted = match args.duration {
        Some(0) => false,
        Some(secs) => {
            print_try(&lab.report);
            println!("lab: up for {secs} s (Ctrl-C stops it sooner)");
            let until = tokio::time::sleep(Duration::from_secs(secs));
            tokio::select! {
                () = until => false,
                () = &mut stop => true,
                () = supervise(&mut lab, &owner, args.output.as_deref()) => false,
            }
        }
        None => {
            print_try(&lab.report);
            println!(
                "lab: running; crashed agents are restarted; Ctrl-C stops it and removes everything"
            );
            tokio::select! {
                () = &mut stop => true,
                () = supervise(&mut lab, &owner, args.output.as_deref()) => false,
            }
        }
    };
    if interrupted {
        println!();
    }
    drop(responders);
    let passed = lab.report.passed;
    lab.teardown().await;
    drop(owner);
    println!("lab: stopped; processes, namespaces, etcd and the lab's files removed");
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Restarts whatever exits while the lab runs (never returns); the facts file follows the
/// new process ids.
async fn supervise(lab: &mut Lab, owner: &owner::Ownership, output: Option<&std::path::Path>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let restarts = lab.supervise(owner);
        for line in &restarts {
            println!("lab: {line}");
        }
        if !restarts.is_empty()
            && let Some(path) = output
            && let Err(e) = write_output(path, &lab.report)
        {
            println!("lab: {e:#}");
        }
    }
}

async fn write_graph(path: &std::path::Path, lab: &Lab) -> anyhow::Result<()> {
    let topology = super::topology::Topology::load(lab.store.as_ref())
        .await
        .context("cannot read the topology from etcd")?;
    let names = lab
        .report
        .workloads
        .iter()
        .map(|w| (w.instance.clone(), w.name.clone()))
        .collect();
    std::fs::write(path, topology.dot(&names))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_output(path: &std::path::Path, report: &LabReport) -> anyhow::Result<()> {
    // Write then rename: a script polling the file never reads half of it.
    let text = serde_json::to_string_pretty(report)? + "\n";
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_try(r: &LabReport) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tenet".into());
    let Some(a) = r.workloads.first() else {
        return;
    };
    println!("Try:");
    if let Some(b) = r
        .workloads
        .iter()
        .find(|b| b.tenant == a.tenant && b.name != a.name)
    {
        println!(
            "  ip netns exec {} ping {}            # {} → {} ({}, same tenant)",
            a.netns, b.ip, a.name, b.name, b.host
        );
    }
    if r.mode == "routed" {
        if let Some(socket) = r.compute_hosts.first().and_then(|h| h.bird_socket.as_ref()) {
            println!(
                "  {exe} node status --socket {}   # {}'s BGP sessions",
                socket.display(),
                r.compute_hosts[0].name
            );
        }
    } else {
        println!(
            "  ip netns exec {} ping {}          # the external host, through NAT",
            a.netns, r.internet.external_ip
        );
    }
    if let Some(f) = a.floating_ip {
        println!(
            "  ip netns exec {} ping {}          # {}'s floating IP from outside",
            r.internet.netns, f, a.name
        );
    }
    if let Some(h) = r.compute_hosts.first() {
        println!(
            "  curl -s http://{}/metrics | grep ^tenet_   # {}'s metrics (also /healthz, /readyz)",
            h.metrics, h.name
        );
    }
    println!("  export ETCD_ENDPOINTS={}", r.etcd.endpoint);
    println!("  {exe} status");
    println!("  {exe} dump /calico/v1/host");
    println!("  {exe} dump /tenet/v1/tenant/{}/ipam", a.tenant);
    println!(
        "  export TENET_SCHEDULER={} TENET_CONTROLLER_CERT={} TENET_CA={}",
        r.scheduler.address,
        r.pki.controller_cert.display(),
        r.pki.ca.display()
    );
    if let Some(c) = r.concentrators.first() {
        println!(
            "  {exe} instance start --tenant {} --subnet {} --concentrator {} --concentrator-ip {}",
            c.tenant, a.subnet, c.uuid, c.underlay_ip
        );
    }
}
