//! The lab's process, its facts file and traffic helpers, for the tests that run `tenet lab`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The running lab; SIGTERM (then SIGKILL) if the test fails before stopping it.
pub struct RunningLab {
    child: Option<Child>,
    out: PathBuf,
}

impl RunningLab {
    pub fn start(dir: &Path, args: &[&str]) -> RunningLab {
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

    /// Starts a lab that stays up (`--duration 900`, facts in DIR/lab.json) with `args`,
    /// waits until it is ready and its checks passed; returns it, its facts and the facts
    /// file (the lab rewrites it when it restarts a process).
    pub fn up(dir: &Path, args: &[&str]) -> (RunningLab, Value, PathBuf) {
        let file = dir.join("lab.json");
        let mut all = args.to_vec();
        all.extend(["--duration", "900", "--output", file.to_str().unwrap()]);
        let mut lab = RunningLab::start(dir, &all);
        let facts = lab.facts(&file);
        assert_eq!(facts["passed"], true, "{}", lab.printed());
        (lab, facts, file)
    }

    pub fn printed(&self) -> String {
        let err = self.out.with_file_name("lab.err");
        format!(
            "{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// Waits for `file` (the lab writes its facts once every check has run).
    pub fn facts(&mut self, file: &Path) -> Value {
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

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // Already gone (and reaped by `facts`, which saw it exit): no signal, and no panic
        // here, which during a test's unwinding would abort every test of the binary and
        // leave the other labs' namespaces behind.
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
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

/// The lab's etcd endpoint and a store on it.
pub fn lab_store(rt: &tokio::runtime::Runtime, facts: &Value) -> (String, tenet::store::EtcdStore) {
    let etcd = str_of(&facts["etcd"], "endpoint").to_string();
    let store = rt
        .block_on(tenet::store::EtcdStore::connect(
            std::slice::from_ref(&etcd),
            tenet::store::EtcdOptions::default(),
        ))
        .unwrap();
    (etcd, store)
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

pub fn in_netns(ns: &str, argv: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn ping(ns: &str, dst: &str) -> bool {
    in_netns(ns, &["ping", "-c", "2", "-i", "0.2", "-W", "1", dst])
        .status
        .success()
}

pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

impl RunningLab {
    /// Re-reads the facts until `ready` holds for them (the lab rewrites the file when it
    /// restarts a process).
    pub fn facts_when(&mut self, file: &Path, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let facts = self.facts(file);
            if ready(&facts) {
                return facts;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: {what}\n{}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The test's own udhcpc script: records the lease, configures the interface, touches
/// nothing else (never /etc/resolv.conf).
const DHCP_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "$ip" > "$LEASE_FILE"
    ;;
esac
exit 0
"#;

/// One DHCP exchange in namespace `ns` (up to `tries` discovers): the leased address.
pub fn dhcp(dir: &Path, ns: &str, tries: u32) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("udhcpc.sh");
    if !script.exists() {
        std::fs::write(&script, DHCP_SCRIPT).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let lease = dir.join(format!("lease-{ns}"));
    let _ = std::fs::remove_file(&lease);
    Command::new("ip")
        .args([
            "netns", "exec", ns, "udhcpc", "-i", "eth0", "-n", "-q", "-f",
        ])
        .args(["-T", "1", "-A", "1", "-t", &tries.to_string(), "-s"])
        .arg(&script)
        .env("LEASE_FILE", &lease)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    std::fs::read_to_string(&lease)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether a process named `name` runs inside namespace `ns`.
pub fn runs_in(ns: &str, name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
}

pub fn kill(pid: u64, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// The concentrator of `tenant` in the lab's facts.
pub fn concentrator<'a>(facts: &'a Value, tenant: &str) -> &'a Value {
    facts["concentrators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["tenant"] == tenant)
        .unwrap_or_else(|| panic!("no concentrator for {tenant}"))
}

/// ciao's START of a container workload in `netns` for `tenant`, on its concentrator and in
/// its subnet (from the lab's facts).
pub fn start_payload(facts: &Value, tenant: &str, instance: &str, netns: &Path) -> Vec<u8> {
    use ssntp::payload::{Payload, Start, StartCommand, VnicNetworking};
    let conc = concentrator(facts, tenant);
    Start::from(StartCommand {
        instance_uuid: instance.into(),
        tenant_uuid: tenant.into(),
        vm_type: "docker".into(),
        networking: VnicNetworking {
            vnic_uuid: format!("vnic-{instance}"),
            concentrator_uuid: str_of(conc, "uuid").into(),
            concentrator_ip: str_of(conc, "underlay_ip").into(),
            subnet: str_of(conc, "subnet").into(),
            netns: netns.to_string_lossy().into_owned(),
            ..Default::default()
        },
        ..Default::default()
    })
    .to_yaml()
}
