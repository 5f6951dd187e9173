//! `tenet ipam` against a real etcd: messages, exit statuses, nothing written on bad input,
//! and a burst of allocations killed part-way that `ipam check` then finds consistent.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tenet::store::Datastore;
use tenet::testbed::EtcdServer;

fn tenet(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(args)
        .env("ETCD_ENDPOINTS", endpoint)
        .env_remove("CALICO_ETCD_ENDPOINTS")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_show_release_and_bad_input() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    assert!(
        tenet(&ep, &["ipam", "pool", "add", "10.90.0.0/24"])
            .status
            .success()
    );

    let o = tenet(
        &ep,
        &[
            "ipam", "assign", "--host", "n1", "--handle", "vnic-1", "--num", "2",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let ips: Vec<String> = out(&o).lines().map(str::to_string).collect();
    assert_eq!(ips.len(), 2);
    let o = tenet(&ep, &["ipam", "show", "--ip", &ips[0]]);
    assert_eq!(
        out(&o).trim(),
        format!("No attributes defined for IP {}", ips[0])
    );
    let o = tenet(&ep, &["ipam", "show", "--ip", "10.90.0.250"]);
    assert!(o.status.success());
    assert!(out(&o).contains("is not"), "{}", out(&o));
    let o = tenet(&ep, &["ipam", "release", "--ip", &ips[0]]);
    assert_eq!(
        out(&o).trim(),
        format!("Successfully released IP address {}", ips[0])
    );
    let o = tenet(&ep, &["ipam", "release", "--ip", &ips[0]]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        err(&o).trim(),
        format!("IP address {} is not assigned", ips[0])
    );
    let o = tenet(
        &ep,
        &["ipam", "assign", "--host", "n1", "--ip", "10.90.0.77"],
    );
    assert_eq!(out(&o).trim(), "10.90.0.77");

    // Bad input: one clear line, non-zero, nothing written.
    let before = store.list("/calico").await.unwrap();
    for (args, want) in [
        (
            vec!["ipam", "assign", "--host", "n1", "--ip", "192.168.1.1"],
            "The provided IP address 192.168.1.1 is not in a configured pool",
        ),
        (
            vec!["ipam", "assign", "--host", "n1", "--pool", "10.0.0.0/33"],
            "invalid CIDR specified: 10.0.0.0/33",
        ),
        (
            vec!["ipam", "assign", "--host", "n1", "--pool", "10.91.0.0/24"],
            "The given pool (10.91.0.0/24) does not exist",
        ),
        (
            vec!["ipam", "assign", "--host", "n1", "--ip", "10.90.0.77"],
            "already assigned",
        ),
        (
            vec!["ipam", "show", "--ip", "ten.one"],
            "invalid IP address specified: ten.one",
        ),
        (
            vec!["ipam", "release", "--handle", "nope"],
            "handle nope does not exist",
        ),
        (
            vec!["ipam", "pool", "add", "10.92.0.1/24"],
            "not a network address",
        ),
    ] {
        let o = tenet(&ep, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", err(&o));
        assert_eq!(
            err(&o).lines().count(),
            1,
            "{args:?}: one line: {}",
            err(&o)
        );
        assert!(err(&o).contains(want), "{args:?}: {}", err(&o));
    }
    let after = store.list("/calico").await.unwrap();
    assert_eq!(before.kvs, after.kvs, "bad input wrote nothing");

    let o = tenet(&ep, &["ipam", "release", "--handle", "vnic-1"]);
    assert!(
        out(&o).contains("Successfully released 1 IP address(es) of handle vnic-1"),
        "{}",
        out(&o)
    );
    let o = tenet(&ep, &["ipam", "check"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("IPAM is consistent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_killed_part_way_leaves_a_consistent_state() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    assert!(
        tenet(&ep, &["ipam", "pool", "add", "10.95.0.0/22"])
            .status
            .success()
    );
    let bin = env!("CARGO_BIN_EXE_tenet");
    // Kill at several points of a burst: SIGKILL to the whole process group, so a tenet
    // process is usually killed in the middle of its request.
    for (round, after_ms) in [150u64, 400, 900, 1600].into_iter().enumerate() {
        let script = format!(
            "i=0; while true; do i=$((i+1)); {bin} ipam assign --host k{round} --handle r{round}-$i --num $((i % 3 + 1)) >/dev/null 2>&1; {bin} ipam release --handle r{round}-$((i/2)) >/dev/null 2>&1; done"
        );
        let mut burst = Command::new("sh")
            .args(["-c", &script])
            .env("ETCD_ENDPOINTS", &ep)
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        let pgid = nix::unistd::Pid::from_raw(burst.id() as i32);
        nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
        burst.wait().unwrap();
    }
    // With no workload endpoints every handle-owned address counts as leaked; everything
    // else (handles vs blocks, affinity keys vs blocks) must agree.
    let o = tenet(&ep, &["ipam", "check"]);
    let report = out(&o);
    assert!(
        report.lines().count() > 1,
        "the bursts allocated something: {report}"
    );
    for line in report.lines().skip(1) {
        assert!(
            line.starts_with("calico: leaked address"),
            "inconsistency after a kill: {line}\n{report}"
        );
    }
    let o = tenet(&ep, &["ipam", "check", "--repair"]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    let o = tenet(&ep, &["ipam", "check"]);
    assert!(
        out(&o).contains("0 allocated addresses") && out(&o).contains("IPAM is consistent"),
        "{}",
        out(&o)
    );
}
