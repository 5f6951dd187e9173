//! The lab's checks, each proven by traffic and named after what it proves: a workload's
//! gateway answers; it reaches every workload of its tenant (the answer names who answered);
//! it reaches the external host through NAT (the external host sees the concentrator's
//! uplink address); its floating IP reaches it from outside; and nothing of another tenant
//! answers it — although both tenants use the same addresses.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::build::{Lab, TENANTS};
use super::probe::{self, Answer, probe, responder};
use super::report::{Check, Progress, WorkloadInfo};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The responders the checks talk to; aborted when dropped.
pub struct Responders(Vec<JoinHandle<()>>);

impl Drop for Responders {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

fn banner(w: &WorkloadInfo) -> String {
    format!("workload {}", w.name)
}
const EXTERNAL_BANNER: &str = "external-host";

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Each tenant's canary: an address only its first workload holds (as a /32), which no
/// workload of another tenant may reach — the address the two tenants do not share.
fn canaries(lab: &Lab) -> Vec<(String, Ipv4Addr, String)> {
    TENANTS
        .iter()
        .filter_map(|t| {
            let holder = lab.report.workloads.iter().find(|w| w.tenant == t.name)?;
            let subnet = lab
                .report
                .concentrators
                .iter()
                .find(|c| c.tenant == t.name)?
                .subnet;
            Some((
                t.name.to_string(),
                subnet.nth(t.canary)?,
                holder.name.clone(),
            ))
        })
        .collect()
}

/// Starts the responders and adds the canaries; then runs every check, printing each as it
/// ends. Returns the responders (they keep serving while the lab runs).
pub async fn run(lab: &mut Lab, progress: &Progress) -> anyhow::Result<Responders> {
    if lab.report.mode == "routed" {
        return run_routed(lab, progress).await;
    }
    let step = progress.step("responders");
    let mut handles = Vec::new();
    for w in &lab.report.workloads {
        handles.push(responder(&netns_path(&w.netns), banner(w))?);
    }
    handles.push(responder(&lab.internet.path(), EXTERNAL_BANNER.into())?);
    let canaries = canaries(lab);
    for (_, ip, holder) in &canaries {
        let w = lab
            .report
            .workloads
            .iter()
            .find(|w| &w.name == holder)
            .expect("the holder is a workload");
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &w.netns, "ip", "addr", "add"])
            .arg(format!("{ip}/32"))
            .args(["dev", "eth0"])
            .output()
            .await?;
    }
    step.done(&format!(
        "TCP {} in every workload and the external host; canaries {}",
        probe::PROBE_PORT,
        canaries
            .iter()
            .map(|(t, ip, h)| format!("{ip} ({t}, on {h})"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let step = progress.step("checks");
    let report = &lab.report;
    let internet = lab.internet.path();
    let per_workload = report.workloads.iter().map(|x| {
        let canaries = &canaries;
        let internet = internet.clone();
        async move {
            let mut out = Vec::new();
            let ns = netns_path(&x.netns);
            let check = |kind: &str, ok: bool, detail: String| Check {
                workload: x.name.clone(),
                kind: kind.into(),
                ok,
                detail,
            };

            let mut ok = false;
            for _ in 0..3 {
                if probe::ping(&x.netns, x.gateway, 1).await {
                    ok = true;
                    break;
                }
            }
            out.push(check("gateway", ok, format!("ping {}", x.gateway)));

            let (mut reached, mut missed) = probe_tenant(&ns, x, &report.workloads).await;
            for (tenant, ip, holder) in canaries.iter().filter(|c| c.0 == x.tenant) {
                match probe(&ns, *ip, PROBE_TIMEOUT).await {
                    Some(a) if a.banner == format!("workload {holder}") => {
                        reached.push(format!("canary {ip}"))
                    }
                    other => missed.push(format!("{tenant}'s canary {ip}: {}", said(&other))),
                }
            }
            out.push(check(
                "tenant",
                missed.is_empty(),
                reach_detail(&reached, &missed),
            ));

            let conc = report
                .concentrators
                .iter()
                .find(|c| c.tenant == x.tenant)
                .expect("every tenant has a concentrator");
            let ext = report.internet.external_ip;
            // Outbound NAT: a workload with a floating IP goes out as that address (1:1),
            // the others as the concentrator's uplink address.
            let expected = x.floating_ip.unwrap_or(conc.uplink_ip);
            let answer = probe(&ns, ext, PROBE_TIMEOUT).await;
            let ok = answer
                .as_ref()
                .is_some_and(|a| a.banner == EXTERNAL_BANNER && a.seen_from == expected);
            out.push(check(
                "internet",
                ok,
                match &answer {
                    Some(a) if ok => format!("{ext} saw the connection come from {expected}"),
                    Some(a) => format!(
                        "{ext} saw the connection come from {}, not {expected}",
                        a.seen_from
                    ),
                    None => format!("{ext}: no answer"),
                },
            ));

            if let Some(public) = x.floating_ip {
                let answer = probe(&internet, public, PROBE_TIMEOUT).await;
                let ok = answer.as_ref().is_some_and(|a| a.banner == banner(x));
                out.push(check(
                    "floating_ip",
                    ok,
                    format!("from {ext} to {public}: {}", said(&answer)),
                ));
            }

            let mut leaks = Vec::new();
            let mut tried = 0;
            for (tenant, ip, _) in canaries.iter().filter(|c| c.0 != x.tenant) {
                tried += 1;
                if probe::ping(&x.netns, *ip, 1).await {
                    leaks.push(format!("ping reached {tenant}'s canary {ip}"));
                }
                if let Some(a) = probe(&ns, *ip, PROBE_TIMEOUT).await {
                    leaks.push(format!("{tenant}'s canary {ip}: {}", a.banner));
                }
            }
            // All at once: a probe that must fail waits out its whole timeout.
            let others: Vec<&WorkloadInfo> = report
                .workloads
                .iter()
                .filter(|y| y.tenant != x.tenant)
                .collect();
            tried += others.len();
            let answers =
                futures::future::join_all(others.iter().map(|y| probe(&ns, y.ip, PROBE_TIMEOUT)))
                    .await;
            for (y, answer) in others.iter().zip(answers) {
                if answer.is_some_and(|a| a.banner == banner(y)) {
                    leaks.push(format!("{} ({}) answered", y.name, y.ip));
                }
            }
            out.push(check(
                "isolation",
                leaks.is_empty(),
                if leaks.is_empty() {
                    format!("no answer from the other tenant ({tried} probes)")
                } else {
                    leaks.join("; ")
                },
            ));
            print_checks(&out);
            out
        }
    });
    let results: Vec<Check> = futures::future::join_all(per_workload)
        .await
        .into_iter()
        .flatten()
        .collect();
    let failed = results.iter().filter(|c| !c.ok).count();
    lab.report.checks.extend(results);
    let total = lab.report.checks.len();
    let failed = failed
        + lab
            .report
            .checks
            .iter()
            .filter(|c| !c.ok && c.kind == "lease")
            .count();
    step.done(&format!("{} of {total} passed", total - failed));
    Ok(Responders(handles))
}

/// Probes every other workload of `x`'s tenant from `x`: (reached, missed), each described.
async fn probe_tenant(
    ns: &std::path::Path,
    x: &WorkloadInfo,
    workloads: &[WorkloadInfo],
) -> (Vec<String>, Vec<String>) {
    let mut reached = Vec::new();
    let mut missed = Vec::new();
    for y in workloads
        .iter()
        .filter(|y| y.tenant == x.tenant && y.name != x.name)
    {
        match probe(ns, y.ip, PROBE_TIMEOUT).await {
            Some(a) if a.banner == banner(y) => {
                reached.push(format!("{} ({} on {})", y.name, y.ip, y.host))
            }
            other => missed.push(format!("{} ({}): {}", y.name, y.ip, said(&other))),
        }
    }
    (reached, missed)
}

fn reach_detail(reached: &[String], missed: &[String]) -> String {
    if missed.is_empty() {
        format!("reached {}", reached.join(", "))
    } else {
        format!("missed {}", missed.join("; "))
    }
}

/// A workload's checks as they end, under the step that runs them.
fn print_checks(checks: &[Check]) {
    for c in checks {
        println!(
            "          {} {:<10} {:<11} {}",
            if c.ok { "✓" } else { "✗" },
            c.workload,
            c.kind,
            c.detail
        );
    }
}

fn said(a: &Option<Answer>) -> String {
    match a {
        Some(a) => format!("{} answered", a.banner),
        None => "no answer".into(),
    }
}

/// How long the routed checks give BGP to converge (BIRD's 2 s scans, session set-up).
const CONVERGE: Duration = Duration::from_secs(30);

/// Routed mode's checks: each host's BGP mesh is up; each workload reaches its host and
/// every workload of its tenant on any host (the answer names who answered).
async fn run_routed(lab: &mut Lab, progress: &Progress) -> anyhow::Result<Responders> {
    let step = progress.step("responders");
    let mut handles = Vec::new();
    for w in &lab.report.workloads {
        handles.push(responder(&netns_path(&w.netns), banner(w))?);
    }
    step.done(&format!("TCP {} in every workload", probe::PROBE_PORT));

    let step = progress.step("BGP mesh");
    let hosts = lab.report.compute_hosts.clone();
    let peers = hosts.len().saturating_sub(1);
    let mut bgp_checks = Vec::new();
    for h in &hosts {
        let socket = h.bird_socket.clone().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + CONVERGE;
        let (ok, detail) = loop {
            let sessions = established_mesh(&socket).await;
            let up = sessions
                .as_ref()
                .map_or(0, |s| s.iter().filter(|(_, up)| *up).count());
            if up >= peers {
                break (true, format!("{up} mesh sessions Established"));
            }
            if tokio::time::Instant::now() > deadline {
                break (
                    false,
                    match sessions {
                        Ok(s) => format!("{up} of {peers} mesh sessions Established: {s:?}"),
                        Err(e) => format!("BIRD at {}: {e}", socket.display()),
                    },
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        bgp_checks.push(Check {
            workload: h.name.clone(),
            kind: "bgp".into(),
            ok,
            detail,
        });
    }
    step.done(&format!(
        "{} of {} hosts with every mesh session up",
        bgp_checks.iter().filter(|c| c.ok).count(),
        hosts.len()
    ));

    let step = progress.step("checks");
    let report = &lab.report;
    let per_workload = report.workloads.iter().map(|x| {
        let hosts = &hosts;
        async move {
            let mut out = Vec::new();
            let ns = netns_path(&x.netns);
            let check = |kind: &str, ok: bool, detail: String| Check {
                workload: x.name.clone(),
                kind: kind.into(),
                ok,
                detail,
            };
            // The gateway is nobody's address: the host answers ARP for it (proxy ARP). Any
            // packet out makes the workload resolve it; under policy, traffic to the host
            // itself is dropped by default (Calico's DefaultEndpointToHostAction), so the
            // proof is the resolved neighbour entry, not a reply.
            let host_ip = hosts
                .iter()
                .find(|h| h.name == x.host)
                .map(|h| h.underlay_ip);
            let mut resolved = None;
            for _ in 0..3 {
                if let Some(ip) = host_ip {
                    probe::ping(&x.netns, ip, 1).await;
                }
                resolved = gateway_mac(&x.netns, x.gateway).await;
                if resolved.is_some() {
                    break;
                }
            }
            out.push(check(
                "host",
                resolved.is_some(),
                match &resolved {
                    Some(mac) => format!("{} is at {mac}: proxy ARP by {}", x.gateway, x.host),
                    None => format!(
                        "{} did not resolve: no proxy ARP from {}",
                        x.gateway, x.host
                    ),
                },
            ));

            // Routes arrive by BGP: a peer's block may take a scan or two after the mesh is up.
            let deadline = tokio::time::Instant::now() + CONVERGE;
            let (reached, missed) = loop {
                let (reached, missed) = probe_tenant(&ns, x, &report.workloads).await;
                if missed.is_empty() || tokio::time::Instant::now() > deadline {
                    break (reached, missed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            out.push(check(
                "tenant",
                missed.is_empty(),
                reach_detail(&reached, &missed),
            ));
            print_checks(&out);
            out
        }
    });
    let results: Vec<Check> = futures::future::join_all(per_workload)
        .await
        .into_iter()
        .flatten()
        .collect();
    lab.report.checks.extend(bgp_checks);
    lab.report.checks.extend(results);
    let total = lab.report.checks.len();
    let failed = lab.report.checks.iter().filter(|c| !c.ok).count();
    step.done(&format!("{} of {total} passed", total - failed));
    Ok(Responders(handles))
}

/// The mesh sessions BIRD reports at `socket`: (peer, Established).
async fn established_mesh(
    socket: &std::path::Path,
) -> Result<Vec<(std::net::IpAddr, bool)>, tenet::bgp::BgpError> {
    let mut control = tenet::bgp::BirdControl::connect(socket).await?;
    Ok(control
        .protocols()
        .await?
        .iter()
        .filter_map(|p| match p.peer() {
            Some((tenet::bgp::PeerType::Mesh, ip)) => Some((ip, p.established())),
            _ => None,
        })
        .collect())
}

/// The MAC the workload resolved `gateway` to, if it did.
async fn gateway_mac(netns: &str, gateway: Ipv4Addr) -> Option<String> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "ip", "neigh", "show"])
        .arg(gateway.to_string())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}
