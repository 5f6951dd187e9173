//! The tenet-scheduler binary: starts from files, serves clients, refuses bad setups clearly.

mod common;

use std::process::{Child, Command, Stdio};

use common::*;
use ssntp::Role;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn scheduler() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tenet-scheduler"))
}

#[tokio::test]
async fn serves_clients_with_the_configuration_file() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(
        dir.path(),
        "sched.pem",
        &pki.issue(Role::SCHEDULER | Role::SERVER).bundle(),
    );
    let ca = write(dir.path(), "ca.pem", pki.ca_pem());
    let cluster = "configure:\n  launcher:\n    compute_net:\n    - 10.254.0.0/24\n";
    let cluster_path = write(dir.path(), "cluster.yaml", cluster);
    let port = free_port();
    let config = write(
        dir.path(),
        "scheduler.yaml",
        &format!(
            "listen: 127.0.0.1:{port}\ncert: {}\nca: {}\nconfiguration: {}\n",
            cert.display(),
            ca.display(),
            cluster_path.display()
        ),
    );
    let _child = Killed(
        scheduler()
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_c, info) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    assert_eq!(info.configuration, cluster.as_bytes());
    assert!(info.role.contains(Role::SCHEDULER));
}

#[test]
fn logs_json_lines_when_asked() {
    use std::io::BufRead;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(
        dir.path(),
        "sched.pem",
        &pki.issue(Role::SCHEDULER | Role::SERVER).bundle(),
    );
    let ca = write(dir.path(), "ca.pem", pki.ca_pem());
    let mut child = Killed(
        scheduler()
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--cert")
            .arg(&cert)
            .arg("--ca")
            .arg(&ca)
            .args(["--log-format", "json"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let first = std::io::BufReader::new(stderr)
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let line: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert_eq!(line["level"], "INFO", "{first}");
    assert!(line["fields"]["message"].is_string(), "{first}");
    assert!(
        line["timestamp"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );
}

#[test]
fn refuses_bad_setups_with_clear_errors() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = write(dir.path(), "agent.pem", &pki.issue(Role::AGENT).bundle());
    let sched = write(
        dir.path(),
        "sched.pem",
        &pki.issue(Role::SCHEDULER).bundle(),
    );
    let ca = write(dir.path(), "ca.pem", pki.ca_pem());
    let bad_cluster = write(
        dir.path(),
        "cluster.yaml",
        "configure:\n  launcher: [1, 2]\n",
    );
    let run = |args: &[&std::ffi::OsStr]| {
        let out = scheduler()
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(err.contains("--cert and --ca are required"), "{err}");
    let err = run(&[
        "--cert".as_ref(),
        agent.as_os_str(),
        "--ca".as_ref(),
        ca.as_os_str(),
    ]);
    assert!(err.contains("holds roles agent but not scheduler"), "{err}");
    let err = run(&[
        "--cert".as_ref(),
        sched.as_os_str(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--configuration".as_ref(),
        bad_cluster.as_os_str(),
    ]);
    assert!(err.contains("configure payload"), "{err}");
    let err = run(&[
        "--cert".as_ref(),
        ca.as_os_str(),
        "--ca".as_ref(),
        ca.as_os_str(),
    ]);
    assert!(err.contains("no private key"), "{err}");
    let missing = dir.path().join("nope.pem");
    let err = run(&[
        "--cert".as_ref(),
        missing.as_os_str(),
        "--ca".as_ref(),
        ca.as_os_str(),
    ]);
    assert!(err.contains("nope.pem"), "{err}");
}
