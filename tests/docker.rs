//! tenet-cn as Docker's remote network and IPAM driver, with a real dockerd (Debian's
//! docker.io) started by the test inside a lab compute host's namespace, with its own data,
//! exec root and socket, vfs storage and no iptables or bridge of its own; it sees /etc
//! through an overlay in a private mount namespace, so the key it writes there stays in the
//! test's directory. Containers on a tenant network reach each other and their gateway (the
//! concentrator, over the tunnel); `--ip` is honoured; a restart of tenet-cn while they run
//! changes nothing for Docker's later calls; removal releases everything.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lab::*;
use serde_json::{Value, json};
use tenet::store::Datastore;

/// A dockerd of the test's own, stopped (with its containers) when dropped.
struct Dockerd {
    child: Child,
    dir: PathBuf,
}

impl Dockerd {
    fn start(dir: &Path, netns: &str) -> Dockerd {
        for d in ["up", "work", "root", "exec"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let script = format!(
            "mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/up,workdir={d}/work /etc && \
             exec nsenter --net=/var/run/netns/{netns} /usr/sbin/dockerd \
             --data-root {d}/root --exec-root {d}/exec -H unix://{d}/docker.sock \
             --pidfile {d}/docker.pid --storage-driver vfs --iptables=false \
             --ip-forward=false --ip-masq=false --bridge=none --log-level warn",
            d = dir.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(std::fs::File::create(dir.join("dockerd.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("dockerd.err")).unwrap())
            .spawn()
            .unwrap();
        let mut d = Dockerd {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.docker(&["info"]).status.success() {
            assert!(
                d.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(dir.join("dockerd.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    /// `/usr/bin/docker` (not the first `docker` on PATH here) against this daemon.
    fn docker(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(format!("unix://{}/docker.sock", self.dir.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?}: {}", printed(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn ip_of(&self, container: &str, network: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            container,
        ])
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            self.docker(&["rm", "-f", id]);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn printed(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A busybox image made here (no registry): the static busybox and a few applets.
fn import_busybox(docker: &Dockerd, dir: &Path) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ping", "sleep", "ip"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    let made = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(made.success());
    docker.ok(&["import", tar.to_str().unwrap(), "tenet/busybox"]);
}

/// One raw call to the plugin's socket: Docker's request without a Content-Type.
fn plugin_call(socket: &Path, method: &str, body: &str) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "POST /{method} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

async fn docker_endpoints(store: &tenet::store::EtcdStore) -> usize {
    store
        .list(tenet::calico::HOSTS)
        .await
        .unwrap()
        .kvs
        .iter()
        .filter(|kv| String::from_utf8_lossy(&kv.value).contains(r#""tenet.kind":"docker""#))
        .count()
}

#[test]
fn dockerd_runs_containers_on_a_tenant_network() {
    use nix::sys::signal::Signal;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, facts, file) =
        RunningLab::up(dir.path(), &["--cns", "1", "--workloads", "1", "--docker"]);
    let host = facts["compute_hosts"][0].clone();
    let socket = PathBuf::from(str_of(&host, "docker_socket"));
    let driver = socket.file_stem().unwrap().to_str().unwrap().to_string();
    let acme = concentrator(&facts, "acme").clone();
    let subnet = str_of(&acme, "subnet").to_string();
    let (etcd, store) = lab_store(&rt, &facts);

    // Bad requests get {"Err": …} and change nothing.
    for (method, body, words) in [
        ("NetworkDriver.CreateNetwork", "{", "malformed"),
        (
            "NetworkDriver.CreateEndpoint",
            r#"{"NetworkID":"nope","EndpointID":"e"}"#,
            "no tenet network nope",
        ),
        (
            "NetworkDriver.Join",
            r#"{"NetworkID":"nope","EndpointID":"e"}"#,
            "no tenet network",
        ),
        (
            "IpamDriver.RequestPool",
            r#"{"Pool":"172.16.0.0/24"}"#,
            "--ipam-opt tenant",
        ),
        (
            "IpamDriver.RequestAddress",
            r#"{"PoolID":"junk"}"#,
            "not a tenet pool",
        ),
        ("NetworkDriver.Bogus", "{}", "not a call"),
        (
            "NetworkDriver.DeleteEndpoint",
            r#"{"NetworkID":"n"}"#,
            "missing field `EndpointID`",
        ),
        (
            "IpamDriver.ReleaseAddress",
            r#"{"Address":"172.16.0.9"}"#,
            "missing field `PoolID`",
        ),
    ] {
        let answer = plugin_call(&socket, method, body);
        let field = match method.starts_with("IpamDriver.") {
            true => "Error",
            false => "Err",
        };
        let err = answer[field].as_str().unwrap_or_default();
        assert!(err.contains(words), "{method}: {answer}");
    }
    let activated = plugin_call(&socket, "Plugin.Activate", "");
    assert_eq!(
        activated["Implements"],
        json!(["NetworkDriver", "IpamDriver"])
    );

    let docker_dir = dir.path().join("docker");
    let docker = Dockerd::start(&docker_dir, str_of(&host, "netns"));
    import_busybox(&docker, dir.path());
    let tenant = "tenant=acme".to_string();
    let conc = format!("concentrator={}", str_of(&acme, "uuid"));
    docker.ok(&[
        "network",
        "create",
        "-d",
        &driver,
        "--ipam-driver",
        &driver,
        "--ipam-opt",
        &tenant,
        "--subnet",
        &subnet,
        "-o",
        &tenant,
        "-o",
        &conc,
        "tnet",
    ]);
    // Without the tenant for IPAM, Docker reports the driver's words.
    let no_tenant = docker.docker(&[
        "network",
        "create",
        "-d",
        &driver,
        "--ipam-driver",
        &driver,
        "--subnet",
        "172.16.8.0/24",
        "-o",
        &tenant,
        "-o",
        &conc,
        "bad",
    ]);
    assert!(!no_tenant.status.success());
    assert!(
        printed(&no_tenant).contains("--ipam-opt tenant"),
        "{}",
        printed(&no_tenant)
    );

    let run = |name: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name, "--network", "tnet"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["tenet/busybox", "sleep", "600"]);
        docker.ok(&args);
    };
    run("c1", &[]);
    run("c2", &[]);
    let (ip1, ip2) = (docker.ip_of("c1", "tnet"), docker.ip_of("c2", "tnet"));
    assert_ne!(ip1, ip2);
    let gateway = tenet::types::gateway_of(&subnet.parse().unwrap()).to_string();
    let pings = |from: &str, to: &str| {
        docker
            .docker(&["exec", from, "ping", "-c", "2", "-W", "2", to])
            .status
            .success()
    };
    assert!(pings("c1", &ip2), "c1 reaches c2 ({ip2})");
    assert!(
        pings("c2", &gateway),
        "c2 reaches its gateway {gateway} over the tunnel"
    );
    let fixed = {
        let net: ipnetwork::Ipv4Network = subnet.parse().unwrap();
        net.nth(200).unwrap().to_string()
    };
    run("c3", &["--ip", &fixed]);
    assert_eq!(docker.ip_of("c3", "tnet"), fixed);
    assert_eq!(rt.block_on(docker_endpoints(&store)), 3);

    // tenet-cn dies and the lab restarts it; Docker's later calls still find everything.
    let old = host["pid"].as_u64().unwrap();
    kill(old, Signal::SIGKILL);
    lab.facts_when(&file, "tenet-cn restarted", |f| {
        f["compute_hosts"][0]["pid"]
            .as_u64()
            .is_some_and(|p| p != old)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the restarted agent serves Docker again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run("c4", &[]);
    assert!(
        pings("c4", &ip1),
        "a container started after the restart reaches c1"
    );
    assert!(pings("c1", &gateway));
    for c in ["c1", "c2", "c3", "c4"] {
        docker.ok(&["rm", "-f", c]);
    }
    docker.ok(&["network", "rm", "tnet"]);
    let agent_log = || {
        let log = std::fs::read_to_string(str_of(&host, "log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("docker"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        rt.block_on(docker_endpoints(&store)),
        0,
        "every endpoint is gone\n{}",
        agent_log()
    );
    let networks = rt
        .block_on(store.list(&tenet::keyspace::docker::network_prefix()))
        .unwrap();
    assert!(networks.kvs.is_empty(), "the network's record is gone");
    let check = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["ipam", "check"])
        .env("ETCD_ENDPOINTS", &etcd)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", printed(&check));
    // The addresses are free again: the fixed one can be asked for anew.
    let pool = format!("acme/{subnet}");
    let again = plugin_call(
        &socket,
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool, "Address": fixed}).to_string(),
    );
    assert_eq!(again["Address"], format!("{fixed}/24"), "{again}");
    plugin_call(
        &socket,
        "IpamDriver.ReleaseAddress",
        &json!({"PoolID": pool, "Address": fixed}).to_string(),
    );
    drop(docker);
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}
