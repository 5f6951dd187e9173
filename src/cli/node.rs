//! `tenet node status` (BIRD's BGP sessions, as calicoctl shows them) and `tenet node
//! checksystem` (what this kernel and host offer tenet, probed in a throw-away namespace).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tenet::bgp::{BirdControl, BirdProtocol};
use tenet::net::tap::{TapOptions, open_tap_in};
use tenet::net::{NewLink, VxlanParams};
use tenet::testbed::Netns;

use super::CliError;

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// This host's BGP sessions (routed mode): peer address, type (node-to-node mesh,
    /// global, node specific), state, since, info — read from BIRD's control socket.
    Status(StatusArgs),
    /// Check that this host's kernel and programs can run tenet: links, firewall, proxy
    /// ARP, GRE (kernel or the user-space fallback), BIRD.
    Checksystem,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// BIRD's control socket (tenet-cn's default run directory keeps it here).
    #[arg(
        long,
        env = "TENET_BIRD_SOCKET",
        default_value = "/run/tenet/bird/bird.ctl"
    )]
    socket: PathBuf,
}

pub async fn run(args: &NodeArgs) -> Result<ExitCode, CliError> {
    match &args.command {
        NodeCommand::Status(a) => status(a).await,
        NodeCommand::Checksystem => checksystem().await,
    }
}

async fn status(args: &StatusArgs) -> Result<ExitCode, CliError> {
    if !args.socket.exists() {
        println!(
            "BIRD is not running: no control socket at {} (routed mode starts it; \
             --socket names another).",
            args.socket.display()
        );
        return Ok(ExitCode::from(1));
    }
    let mut control = BirdControl::connect(&args.socket)
        .await
        .with_context(|| "BIRD does not answer on its control socket")?;
    let protocols = control
        .protocols()
        .await
        .with_context(|| "reading BIRD's protocols")?;
    println!("BIRD is running.");
    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        println!("\n{family} BGP status");
        let rows = peer_rows(&protocols, v6);
        if rows.is_empty() {
            println!("No {family} peers found.");
        } else {
            print!(
                "{}",
                bordered_table(
                    &["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"],
                    &rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The Calico peers among BIRD's protocols, one family, as table rows.
fn peer_rows(protocols: &[BirdProtocol], v6: bool) -> Vec<Vec<String>> {
    protocols
        .iter()
        .filter_map(|p| {
            let (kind, ip) = p.peer()?;
            (matches!(ip, IpAddr::V6(_)) == v6).then(|| {
                vec![
                    ip.to_string(),
                    kind.describe().to_string(),
                    p.state.clone(),
                    p.since.replace('T', " "),
                    p.info.clone(),
                ]
            })
        })
        .collect()
}

/// calicoctl's table: `+---+` rules, `|`-separated cells, headings centred.
fn bordered_table(headings: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headings
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule = {
        let cells: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
        format!("+{}+\n", cells.join("+"))
    };
    let line = |cells: Vec<String>| format!("|{}|\n", cells.join("|"));
    let mut out = rule.clone();
    out += &line(
        headings
            .iter()
            .zip(&widths)
            .map(|(h, w)| format!(" {h:^w$} "))
            .collect(),
    );
    out += &rule;
    for r in rows {
        out += &line(
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!(" {c:<w$} "))
                .collect(),
        );
    }
    out += &rule;
    out
}

/// One line of the checksystem report.
struct Check {
    what: &'static str,
    outcome: Outcome,
}

enum Outcome {
    Ok(String),
    /// tenet works without it, with the stated consequence.
    Warn(String),
    Fail(String),
}

async fn checksystem() -> Result<ExitCode, CliError> {
    if !nix::unistd::geteuid().is_root() {
        println!("checksystem needs root (it probes the kernel in a network namespace).");
        return Ok(ExitCode::from(1));
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!("Checking kernel version...");
    println!("\t\t{release:<40}OK");
    println!("Checking kernel features and programs...");
    let checks = probe().await.context("probing the kernel")?;
    let mut failed = false;
    for c in &checks {
        let (word, detail) = match &c.outcome {
            Outcome::Ok(d) => ("OK", d),
            Outcome::Warn(d) => ("WARN", d),
            Outcome::Fail(d) => {
                failed = true;
                ("FAIL", d)
            }
        };
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!("  ({detail})")
        };
        println!("\t\t{:<40}{word}{detail}", c.what);
    }
    if failed {
        println!("System doesn't meet one or more minimum requirements to run tenet.");
        Ok(ExitCode::from(1))
    } else {
        println!("System meets minimum system requirements to run tenet!");
        Ok(ExitCode::SUCCESS)
    }
}

/// Makes each kind of object tenet needs in a throw-away namespace.
async fn probe() -> anyhow::Result<Vec<Check>> {
    let ns = Netns::create("check").context("creating a namespace to probe in")?;
    let netlink = ns.netlink().context("netlink in the probe namespace")?;
    let mut checks = Vec::new();
    let link = |what, r: Result<_, tenet::net::NetError>, required: bool| Check {
        what,
        outcome: match r {
            Ok(_) => Outcome::Ok(String::new()),
            Err(e) if required => Outcome::Fail(e.to_string()),
            Err(e) => Outcome::Warn(e.to_string()),
        },
    };
    let bridge = netlink.create(&NewLink::bridge("chkbr0")).await;
    checks.push(link("bridge", bridge.map(|_| ()), true));
    let veth = netlink.create(&NewLink::veth("chkv0", "chkv1")).await;
    checks.push(link("veth", veth.map(|_| ()), true));
    let tap = open_tap_in(Some(&ns.path()), "chktap0", TapOptions::default());
    checks.push(link("tap (/dev/net/tun)", tap.map(|_| ()), true));
    let vxlan = netlink
        .create(&NewLink::vxlan(
            "chkvx0",
            VxlanParams {
                vni: 42,
                local: None,
                remote: None,
                dev: None,
                port: 4789,
                learning: false,
            },
        ))
        .await;
    checks.push(link("vxlan (vxlan overlay)", vxlan.map(|_| ()), false));
    let gre = tenet::net::tunnel::kernel_supports_gretap(&netlink).await;
    checks.push(Check {
        what: "gretap",
        outcome: match gre {
            Ok(true) => Outcome::Ok("kernel GRE".into()),
            Ok(false) => Outcome::Warn(
                "no ip_gre in this kernel: tenet's eBPF (else user-space) GRE datapath is used"
                    .into(),
            ),
            Err(e) => Outcome::Warn(e.to_string()),
        },
    });
    checks.push(Check {
        what: "eBPF GRE datapath",
        outcome: match tenet::net::tunnel::ebpf::probe() {
            Ok(()) => Outcome::Ok("its tc programs load".into()),
            Err(e) => Outcome::Warn(format!("{e}: the user-space GRE datapath is used")),
        },
    });
    for (what, key, required) in [
        (
            "proxy ARP (routed mode)",
            "net.ipv4.conf.default.proxy_arp",
            true,
        ),
        (
            "proxy NDP (routed IPv6)",
            "net.ipv6.conf.default.proxy_ndp",
            false,
        ),
        (
            "br_netfilter (policy on bridges)",
            "net.bridge.bridge-nf-call-iptables",
            false,
        ),
    ] {
        let r = tenet::net::sysctl::read(Some(&ns.path()), key);
        checks.push(link(what, r.map(|_| ()), required));
    }
    for (what, argv, required) in [
        (
            "iptables",
            &["iptables", "-w", "-n", "-L", "INPUT"][..],
            true,
        ),
        (
            "ip6tables",
            &["ip6tables", "-w", "-n", "-L", "INPUT"],
            false,
        ),
        ("ipset", &["ipset", "list", "-n"], true),
        ("dnsmasq (concentrators)", &["dnsmasq", "--version"], false),
        ("bird (BIRD 2, routed mode)", &["bird", "--version"], false),
    ] {
        let out = tenet::process::Command::new(argv[0])
            .args(argv[1..].iter().copied())
            .netns(Some(&ns.path()))
            .run()
            .await;
        checks.push(Check {
            what,
            outcome: match (out, required) {
                (Ok(_), _) => Outcome::Ok(String::new()),
                (Err(e), true) => Outcome::Fail(e.to_string()),
                (Err(e), false) => Outcome::Warn(e.to_string()),
            },
        });
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_looks_like_calicoctls() {
        let t = bordered_table(
            &["PEER ADDRESS", "STATE"],
            &[vec!["10.0.0.2".into(), "up".into()]],
        );
        assert_eq!(
            t,
            "+--------------+-------+\n\
             | PEER ADDRESS | STATE |\n\
             +--------------+-------+\n\
             | 10.0.0.2     | up    |\n\
             +--------------+-------+\n"
        );
    }
}
