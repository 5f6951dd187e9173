//! `tenet felix-driver` started as Felix starts its external driver: messages in on fd 3,
//! answers out on fd 4. Hand-built ToDataplane messages become chains and IP sets in a
//! namespace; the driver answers with process and endpoint status; closing the pipe removes
//! everything it made.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use prost::Message;
use tenet::policy::proto::{self, from_dataplane, to_dataplane::Payload};
use tenet::policy::render::ipset_name;
use tenet::testbed::Netns;

fn frame(seq: u64, payload: Payload) -> Vec<u8> {
    let body = proto::ToDataplane {
        sequence_number: seq,
        payload: Some(payload),
    }
    .encode_to_vec();
    let mut out = (body.len() as u64).to_le_bytes().to_vec();
    out.extend(body);
    out
}

/// Reads the driver's answers on a thread, so a silent driver fails the test, not hangs it.
fn answers(fd: OwnedFd) -> mpsc::Receiver<from_dataplane::Payload> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut pipe = std::fs::File::from(fd);
        loop {
            let mut len = [0u8; 8];
            if pipe.read_exact(&mut len).is_err() {
                return;
            }
            let mut body = vec![0u8; u64::from_le_bytes(len) as usize];
            if pipe.read_exact(&mut body).is_err() {
                return;
            }
            let msg = proto::FromDataplane::decode(body.as_slice()).unwrap();
            if tx.send(msg.payload.unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for(
    rx: &mpsc::Receiver<from_dataplane::Payload>,
    what: &str,
    pick: impl Fn(&from_dataplane::Payload) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(p) if pick(&p) => return,
            Ok(_) => {}
            Err(_) => panic!("the driver never sent {what}"),
        }
    }
}

#[test]
fn felix_drives_the_driver_over_fd_3_and_4() {
    let ns = Netns::create("fdrv").unwrap();
    // This kernel has no dummy links: a veth pair stands for the workload's interface.
    ns.run(&[
        "ip", "link", "add", "cali1234", "type", "veth", "peer", "name", "wl1234",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "wl1234", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "cali1234", "up"]).unwrap();
    let (to_driver_r, to_driver_w) = nix::unistd::pipe().unwrap();
    let (from_driver_r, from_driver_w) = nix::unistd::pipe().unwrap();
    let (child_in, child_out) = (to_driver_r.as_raw_fd(), from_driver_w.as_raw_fd());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenet"));
    cmd.args([
        "felix-driver",
        "--netns",
        ns.path().to_str().unwrap(),
        "--status-interval",
        "1",
    ])
    .stdin(Stdio::null());
    // Felix's ExtraFiles: its pipe ends become the driver's fd 3 and 4.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(to_driver_r);
    drop(from_driver_w);
    let rx = answers(from_driver_r);
    let mut felix = std::fs::File::from(to_driver_w);

    let set = "s:test-set-for-the-driver-000000000000000";
    let mut seq = 0;
    let mut send = |p: Payload| {
        felix.write_all(&frame(seq, p)).unwrap();
        seq += 1;
    };
    let ep_id = proto::WorkloadEndpointId {
        orchestrator_id: "k8s".into(),
        workload_id: "w1".into(),
        endpoint_id: "eth0".into(),
    };
    send(Payload::ConfigUpdate(proto::ConfigUpdate {
        config: [("LogPrefix".to_string(), "tenet".to_string())].into(),
    }));
    send(Payload::IpsetUpdate(proto::IpSetUpdate {
        id: set.into(),
        members: vec!["10.0.0.1".into(), "10.0.0.2".into()],
    }));
    send(Payload::ActivePolicyUpdate(proto::ActivePolicyUpdate {
        id: Some(proto::PolicyId {
            tier: "default".into(),
            name: "web".into(),
        }),
        policy: Some(proto::Policy {
            inbound_rules: vec![proto::Rule {
                action: "allow".into(),
                protocol: Some(proto::Protocol {
                    number_or_name: Some(proto::protocol::NumberOrName::Name("tcp".into())),
                }),
                src_ip_set_ids: vec![set.into()],
                dst_ports: vec![proto::PortRange {
                    first: 80,
                    last: 80,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
    }));
    send(Payload::WorkloadEndpointUpdate(
        proto::WorkloadEndpointUpdate {
            id: Some(ep_id.clone()),
            endpoint: Some(proto::WorkloadEndpoint {
                state: "active".into(),
                name: "cali1234".into(),
                ipv4_nets: vec!["10.0.0.5/32".into()],
                tiers: vec![proto::TierInfo {
                    name: "default".into(),
                    ingress_policies: vec!["web".into()],
                    egress_policies: vec![],
                }],
                ..Default::default()
            }),
        },
    ));
    send(Payload::InSync(proto::InSync {}));

    wait_for(&rx, "the endpoint's status", |p| {
        matches!(p, from_dataplane::Payload::WorkloadEndpointStatusUpdate(u)
            if u.status.as_ref().unwrap().status == "up")
    });
    wait_for(
        &rx,
        "a process status",
        |p| matches!(p, from_dataplane::Payload::ProcessStatusUpdate(u) if u.iso_timestamp.ends_with('Z')),
    );
    let rules = ns.run(&["iptables-save"]).unwrap();
    let set_name = ipset_name(set);
    assert!(
        rules.contains(&format!(
            "-A cali-pi-web -p tcp -m set --match-set {set_name} src -m multiport --dports 80"
        )),
        "{rules}"
    );
    assert!(rules.contains("-A cali-tw-cali1234"), "{rules}");
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with("-A cali-to-wl-dispatch -o cali1234 ")
                && l.ends_with("-g cali-tw-cali1234")),
        "{rules}"
    );
    let members = ns.run(&["ipset", "list", &set_name]).unwrap();
    assert!(
        members.contains("10.0.0.1") && members.contains("10.0.0.2"),
        "{members}"
    );

    // A delta and an endpoint removal.
    send(Payload::IpsetDeltaUpdate(proto::IpSetDeltaUpdate {
        id: set.into(),
        added_members: vec!["10.0.0.3".into()],
        removed_members: vec!["10.0.0.2".into()],
    }));
    send(Payload::WorkloadEndpointRemove(
        proto::WorkloadEndpointRemove { id: Some(ep_id) },
    ));
    wait_for(&rx, "the endpoint's status removal", |p| {
        matches!(p, from_dataplane::Payload::WorkloadEndpointStatusRemove(_))
    });
    let members = ns.run(&["ipset", "list", &set_name]).unwrap();
    assert!(
        members.contains("10.0.0.3") && !members.contains("10.0.0.2"),
        "{members}"
    );
    assert!(
        !ns.run(&["iptables-save"])
            .unwrap()
            .contains("cali-tw-cali1234")
    );

    // Felix goes away: the driver cleans up and exits 0.
    drop(felix);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let rules = ns.run(&["iptables-save"]).unwrap();
    assert!(!rules.contains("cali"), "left behind:\n{rules}");
    assert!(!ns.run(&["ipset", "list", "-n"]).unwrap().contains("cali"));
}

#[test]
fn without_its_pipes_the_driver_says_how_it_is_started() {
    let out = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["felix-driver", "--input-fd", "97", "--output-fd", "98"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fd 97") && err.contains("started by Felix"),
        "{err}"
    );
}
