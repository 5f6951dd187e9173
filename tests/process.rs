//! `tenet::process` against real programs: coreutils, sh, and dnsmasq (run with `--test`, and
//! as a supervised daemon inside a namespace). Needs root for the namespace tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tenet::process::netlink_groups::multicast_groups;
use tenet::process::{Command, Daemon, DaemonSpec, DaemonStatus, ProcessError, Readiness};
use tenet::testbed::Netns;

/// Kills whatever the pid file names (and its group) when the test ends, passed or failed:
/// a dropped `Daemon` handle leaves its process running by design.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(&self.0)
            && let Ok(pid) = text.trim().parse::<i32>()
        {
            // SAFETY: plain kill(2) calls.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn spec(dir: &Path, name: &str, program: &str, args: &[&str]) -> DaemonSpec {
    let mut s = DaemonSpec::new(name, program)
        .args(args.iter().copied())
        .run_dir(dir);
    s.backoff.initial = Duration::from_millis(20);
    s.stop_grace = Duration::from_millis(500);
    s
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
}

async fn running_after(d: &Daemon, old: u32) -> u32 {
    let mut watch = d.watch();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| matches!(s, DaemonStatus::Running { pid } if *pid != old)),
    )
    .await
    .expect("restarted within 10 s")
    .expect("supervisor alive");
    match *status {
        DaemonStatus::Running { pid } => pid,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn commands_fail_with_what_went_wrong() {
    let out = Command::new("sh")
        .args(["-c", "echo out; echo err >&2"])
        .run()
        .await
        .unwrap();
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");

    let e = Command::new("sh")
        .args(["-c", "echo first >&2; echo 'the reason' >&2; exit 3"])
        .run()
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ProcessError::Failed { .. }), "{e:?}");
    assert!(text.contains("sh -c"), "names the command: {text}");
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(text.contains("the reason"), "quotes stderr: {text}");

    let e = Command::new("tenet-no-such-program")
        .run()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("tenet-no-such-program") && e.to_string().contains("installed"),
        "{e}"
    );

    let echoed = Command::new("cat").stdin("line one\n").run().await.unwrap();
    assert_eq!(echoed.stdout, "line one\n");
}

#[tokio::test]
async fn commands_run_inside_a_namespace() {
    let ns = Netns::create("proc").unwrap();
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .netns(Some(&ns.path()))
        .run()
        .await
        .unwrap();
    let names: Vec<&str> = links
        .stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .collect();
    assert_eq!(names, ["lo"], "a fresh namespace has only lo");
    let e = Command::new("true")
        .netns(Some(Path::new("/run/netns/tenet-no-such-ns")))
        .run()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tenet-no-such-ns"), "{e}");
}

#[tokio::test]
async fn dnsmasq_test_mode_checks_a_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.conf");
    std::fs::write(
        &good,
        "dhcp-range=172.16.0.2,172.16.0.254,255.255.255.0,1h\n",
    )
    .unwrap();
    let ok = Command::new("dnsmasq")
        .args([
            "--test".to_string(),
            format!("--conf-file={}", good.display()),
        ])
        .run()
        .await
        .unwrap();
    assert!(
        format!("{}{}", ok.stdout, ok.stderr).contains("syntax check OK"),
        "{ok:?}"
    );
    let bad = dir.path().join("bad.conf");
    std::fs::write(&bad, "dhcp-range=not-an-address\n").unwrap();
    let e = Command::new("dnsmasq")
        .args([
            "--test".to_string(),
            format!("--conf-file={}", bad.display()),
        ])
        .run()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("dnsmasq"), "{e}");
    assert!(
        e.to_string().contains("bad.conf"),
        "dnsmasq's own message names the file: {e}"
    );
}

/// A tracing writer whose text so far can be awaited.
#[derive(Clone)]
struct Captured(Arc<tokio::sync::watch::Sender<String>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .send_modify(|text| text.push_str(&String::from_utf8_lossy(buf)));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    async fn until_it_says(&self, what: &str) {
        let mut text = self.0.subscribe();
        tokio::time::timeout(Duration::from_secs(10), text.wait_for(|t| t.contains(what)))
            .await
            .unwrap_or_else(|_| panic!("no log line with {what:?} in 10 s"))
            .unwrap();
    }
}

// The current-thread runtime runs the log follower on this thread, under this subscriber.
#[tokio::test]
async fn a_daemons_output_is_logged_also_after_a_quiet_spell() {
    let captured = Captured(Arc::new(tokio::sync::watch::channel(String::new()).0));
    let writer = captured.clone();
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        "talker",
        "sh",
        &["-c", "echo said at the start; exec sleep 1000"],
    );
    let _reaper = Reaper(s.pid_file());
    let d = Daemon::start(s.clone()).await.unwrap();
    captured.until_it_says("said at the start").await;

    // Quiet for a while, the follower looks less often; a line written then still comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(s.log_file())
        .unwrap();
    std::io::Write::write_all(&mut log, b"said after a quiet spell\n").unwrap();
    captured.until_it_says("said after a quiet spell").await;
    let text = captured.0.borrow().clone();
    for said in ["said at the start", "said after a quiet spell"] {
        assert!(
            text.lines()
                .any(|l| l.contains(said) && l.contains("daemon=talker")),
            "{said:?} logged with the daemon's name:\n{text}"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn a_killed_daemon_is_restarted_and_stop_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "sleeper", "sleep", &["1000"]);
    let _reaper = Reaper(s.pid_file());
    let d = Daemon::start(s.clone()).await.unwrap();
    let first = d.pid().unwrap();
    assert!(alive(first));
    assert_eq!(
        std::fs::read_to_string(s.pid_file()).unwrap().trim(),
        first.to_string()
    );

    // kill -9: the supervisor starts it again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let second = running_after(&d, first).await;
    assert!(alive(second) && !alive(first));
    assert_eq!(d.restarts(), 1);
    assert_eq!(
        std::fs::read_to_string(s.pid_file()).unwrap().trim(),
        second.to_string()
    );

    d.stop().await;
    assert!(!alive(second), "stop ends the process");
    assert!(!s.pid_file().exists(), "and removes its pid file");
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "adoptee", "sleep", &["1001"]);
    let _reaper = Reaper(s.pid_file());
    let d = Daemon::start(s.clone()).await.unwrap();
    let pid = d.pid().unwrap();
    assert!(!d.adopted());
    drop(d); // the agent goes away; the daemon stays

    assert!(alive(pid));
    let again = Daemon::start(s.clone()).await.unwrap();
    assert!(again.adopted(), "the second start adopts");
    assert_eq!(again.pid(), Some(pid), "no second process");

    // Adopted daemons are supervised too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = running_after(&again, pid).await;
    assert!(alive(replaced));
    again.stop().await;
    assert!(!alive(replaced));

    // A pid file naming some other process is not adopted.
    std::fs::write(s.pid_file(), format!("{}\n", std::process::id())).unwrap();
    let fresh = Daemon::start(s.clone()).await.unwrap();
    assert!(!fresh.adopted());
    assert_ne!(fresh.pid(), Some(std::process::id()));
    fresh.stop().await;
}

#[tokio::test]
async fn a_daemon_that_cannot_start_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        "broken",
        "sh",
        &["-c", "echo 'bad option --frobnicate' >&2; exit 1"],
    )
    .readiness(Readiness::ListeningUdp(67));
    let e = match Daemon::start(s.clone()).await {
        Ok(_) => panic!("a daemon that exits at once must not start"),
        Err(e) => e,
    };
    let text = e.to_string();
    assert!(matches!(e, ProcessError::StartFailed { .. }), "{e:?}");
    assert!(
        text.contains("broken") && text.contains("exit status 1"),
        "{text}"
    );
    assert!(
        text.contains("bad option --frobnicate"),
        "quotes its log: {text}"
    );
    assert!(!s.pid_file().exists());

    let missing = spec(dir.path(), "missing", "tenet-no-such-daemon", &[]);
    let e = match Daemon::start(missing).await {
        Ok(_) => panic!("a missing program must not start"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("tenet-no-such-daemon"), "{e}");
}

#[tokio::test]
async fn a_daemon_deaf_to_sigterm_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(
        dir.path(),
        "stubborn",
        "sh",
        &["-c", "trap '' TERM; sleep 1002 & wait"],
    );
    s.stop_grace = Duration::from_millis(200);
    let _reaper = Reaper(s.pid_file());
    let d = Daemon::start(s).await.unwrap();
    let pid = d.pid().unwrap();
    // The shell's child, found by its command line.
    let helper = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(p) = children_of(pid).into_iter().next() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the shell forks its sleep");
    d.stop().await;
    assert!(!alive(pid), "SIGKILL after the grace period");
    // The group got SIGKILL with the shell; the kernel ends the helper asynchronously.
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while alive(helper) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "its process group goes with it");
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::test]
async fn dnsmasq_runs_supervised_in_a_namespace_and_reloads() {
    let ns = Netns::create("dnsm").unwrap();
    ns.run(&["ip", "link", "add", "br0", "type", "bridge"])
        .unwrap();
    ns.run(&["ip", "addr", "add", "172.16.0.1/24", "dev", "br0"])
        .unwrap();
    ns.run(&["ip", "link", "set", "br0", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("leases");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "02:00:ac:10:00:05,172.16.0.5\n").unwrap();
    let hosts_arg = format!("--dhcp-hostsfile={}", hosts.display());
    let s = spec(
        dir.path(),
        "dnsmasq-test",
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--port=0",
            "--interface=br0",
            "--bind-interfaces",
            "--except-interface=lo",
            "--dhcp-range=172.16.0.2,172.16.0.254,255.255.255.0,1h",
            &format!("--dhcp-leasefile={}", leases.display()),
            "--log-dhcp",
            "--log-facility=-",
            &hosts_arg,
        ],
    )
    .netns(Some(&ns.path()))
    .readiness(Readiness::ListeningUdp(67));
    let mut s = s;
    s.deaf_to_netlink_events = true;
    let _reaper = Reaper(s.pid_file());
    let d = Daemon::start(s.clone()).await.unwrap();
    let pid = d.pid().unwrap();
    assert!(alive(pid));
    // Off the address and route notifications it subscribes to.
    assert_eq!(multicast_groups(pid).unwrap(), Vec::<u32>::new());

    // SIGHUP: dnsmasq re-reads its hosts file (it logs each read) and keeps running as the
    // same process.
    let log = s.log_file();
    let reads = |text: &str| text.matches(&format!("read {}", hosts.display())).count();
    let wait_reads = |n: usize| {
        let log = log.clone();
        async move {
            let seen = tokio::time::timeout(Duration::from_secs(5), async {
                while !std::fs::read_to_string(&log).is_ok_and(|l| reads(&l) == n) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(
                seen.is_ok(),
                "dnsmasq logged {n} reads of its hosts file: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    wait_reads(1).await;
    d.reload().unwrap();
    wait_reads(2).await;
    assert_eq!(d.pid(), Some(pid));

    // kill -9 → restarted, listening again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let again = running_after(&d, pid).await;
    assert!(alive(again));
    // The new one too: once it has said it started (its netlink socket is open by then),
    // it leaves its groups.
    let deaf = tokio::time::timeout(Duration::from_secs(5), async {
        let started =
            || std::fs::read_to_string(&log).map_or(0, |l| l.matches("started, version").count());
        while started() < 2 || multicast_groups(again).map_or(true, |g| !g.is_empty()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(deaf.is_ok(), "{:?}", multicast_groups(again));
    d.stop().await;
    assert!(!alive(again));
}
