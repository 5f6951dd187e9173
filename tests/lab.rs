//! `tenet lab` end to end: the real binaries (etcd, tenet-scheduler, tenet-cn, tenet-cnci,
//! dnsmasq, udhcpc) built into a two-tenant cloud. The lab's own checks must all pass, and
//! this test checks independently, with traffic of its own, that a cross-tenant ping fails
//! (while the same ping within the tenant works) and that a workload's connection to the
//! external host succeeds through NAT. SIGTERM then tears everything down.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tenet::net::NetError;
use tenet::net::netns::run_in;

/// The running lab; SIGTERM (then SIGKILL) if the test fails before stopping it.
struct RunningLab {
    child: Option<Child>,
    out: PathBuf,
}

impl RunningLab {
    fn start(dir: &Path, args: &[&str]) -> RunningLab {
        let out = dir.join("lab.out");
        let child = Command::new(env!("CARGO_BIN_EXE_tenet"))
            .arg("lab")
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("lab.err")).unwrap())
            .spawn()
            .unwrap();
        RunningLab {
            child: Some(child),
            out,
        }
    }

    fn printed(&self) -> String {
        let err = self.out.with_file_name("lab.err");
        format!(
            "{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// Waits for `file` (the lab writes its facts once every check has run).
    fn facts(&mut self, file: &Path) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !file.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the lab exited ({status}) before it was ready:\n{}",
                    self.printed()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the lab is not ready:\n{}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
            eprintln!("--- the lab printed ---\n{}", self.printed());
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

fn in_netns(ns: &str, argv: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ping(ns: &str, dst: &str) -> bool {
    in_netns(ns, &["ping", "-c", "2", "-i", "0.2", "-W", "1", dst])
        .status
        .success()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn the_lab_builds_a_two_tenant_cloud_and_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let facts_file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &[
            "--duration",
            "600",
            "--output",
            facts_file.to_str().unwrap(),
        ],
    );
    let facts = lab.facts(&facts_file);

    // The lab's own checks.
    let checks = facts["checks"].as_array().unwrap();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        lab.printed()
    );
    assert_eq!(facts["passed"], true);
    for kind in [
        "lease",
        "gateway",
        "tenant",
        "internet",
        "floating_ip",
        "isolation",
    ] {
        assert!(
            checks.iter().any(|c| c["kind"] == kind),
            "no {kind} check was run"
        );
    }
    let workloads = facts["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 4, "2 tenants × 2 workloads");
    let of = |tenant: &str| -> Vec<&Value> {
        workloads.iter().filter(|w| w["tenant"] == tenant).collect()
    };
    let (acme, globex) = (of("acme"), of("globex"));
    assert_eq!((acme.len(), globex.len()), (2, 2));
    for tenant in [&acme, &globex] {
        assert_ne!(
            tenant[0]["host"], tenant[1]["host"],
            "a tenant's workloads are spread over the compute hosts"
        );
        assert!(tenant.iter().any(|w| w["floating_ip"].is_string()));
    }
    assert!(
        workloads.iter().all(|w| w["subnet"] == "172.16.0.0/24"),
        "both tenants use the same subnet"
    );
    assert_eq!(facts["compute_hosts"].as_array().unwrap().len(), 2);
    assert_eq!(facts["concentrators"].as_array().unwrap().len(), 2);

    // Independently: an address of this test's own on a globex workload is reached by the
    // other globex workload, and not by acme's, which share every other address.
    let (g0, g1) = (str_of(globex[0], "netns"), str_of(globex[1], "netns"));
    let a0 = str_of(acme[0], "netns");
    let mine = "172.16.0.240";
    assert!(
        in_netns(
            g0,
            &["ip", "addr", "add", &format!("{mine}/32"), "dev", "eth0"]
        )
        .status
        .success()
    );
    assert!(ping(g1, mine), "within globex, {mine} answers");
    assert!(!ping(a0, mine), "acme must not reach globex's {mine}");

    // Independently: a TCP connection from an acme workload without a floating IP to a
    // listener of this test's own on the external host, seen from the concentrator's uplink.
    let plain = acme
        .iter()
        .find(|w| w["floating_ip"].is_null())
        .expect("an acme workload without a floating IP");
    let external: Ipv4Addr = str_of(&facts["internet"], "external_ip").parse().unwrap();
    let listener = run_in(
        Some(&netns_path(str_of(&facts["internet"], "netns"))),
        || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                .map_err(|e| NetError::new("bind", "listener", e))
        },
    )
    .unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let mut conn = run_in(Some(&netns_path(str_of(plain, "netns"))), move || {
        TcpStream::connect_timeout(&SocketAddr::from((external, port)), Duration::from_secs(5))
            .map_err(|e| NetError::new("connect", "external host", e))
    })
    .expect("the external host accepts a connection from the workload");
    let peer = accepted.join().unwrap().unwrap();
    let uplink = facts["concentrators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["tenant"] == "acme")
        .map(|c| str_of(c, "uplink_ip").to_string())
        .unwrap();
    assert_eq!(
        peer.ip().to_string(),
        uplink,
        "NAT to the concentrator's uplink"
    );
    let _ = conn.read(&mut [0u8; 1]);

    // SIGTERM: a clean exit and nothing left.
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
    assert!(lab.printed().contains("lab: stopped"), "{}", lab.printed());
    let namespaces = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for w in workloads {
        assert!(!namespaces.contains(str_of(w, "netns")), "{namespaces}");
    }
    for c in facts["compute_hosts"].as_array().unwrap() {
        assert!(!namespaces.contains(str_of(c, "netns")), "{namespaces}");
        let pid = c["pid"].as_u64().unwrap();
        assert!(
            !tenet::process::procfs::alive(pid as u32),
            "tenet-cn {pid} still runs"
        );
    }
    let etcd_pid = facts["etcd"]["pid"].as_u64().unwrap() as u32;
    assert!(!tenet::process::procfs::alive(etcd_pid), "etcd still runs");
    assert!(!Path::new(str_of(&facts["etcd"], "data_dir")).exists());
    assert!(!Path::new(str_of(&facts["pki"], "dir")).exists());
}
