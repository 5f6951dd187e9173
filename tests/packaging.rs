//! The Debian package as operators install it: built with `cargo deb` from this workspace's
//! binaries, unpacked into a scratch root (`dpkg -x`), its contents and declared
//! dependencies checked, and its systemd units verified by `systemd-analyze verify` against
//! that root (syntax, and that each ExecStart program is in the package).

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup.sh installs what it needs)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_installs_binaries_units_and_examples() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("tenet.deb");
    // The debug build of every binary, stripped and lightly compressed: the package's layout
    // is what is tested, not the release build. `cargo test --workspace` has built them all
    // (each package's integration tests need its binaries).
    for bin in [
        "tenet",
        "tenet-cn",
        "tenet-cnci",
        "tenet-scheduler",
        "tenet-cni",
    ] {
        assert!(
            workspace.join("target/debug").join(bin).exists(),
            "target/debug/{bin} is missing: run `cargo build --workspace` (or the whole suite) first"
        );
    }
    run(Command::new(env!("CARGO"))
        .current_dir(workspace)
        .args([
            "deb",
            "-p",
            "tenet",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "-o",
        ])
        .arg(&deb));

    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for dep in [
        "iproute2",
        "iptables",
        "ipset",
        "conntrack",
        "dnsmasq-base",
        "etcd-client",
    ] {
        assert!(
            info.lines()
                .any(|l| l.trim_start().starts_with("Depends:") && l.contains(dep)),
            "Depends lacks {dep}:\n{info}"
        );
    }
    assert!(info.contains("Recommends: bird2"), "{info}");

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    for bin in ["tenet", "tenet-cn", "tenet-cnci", "tenet-scheduler"] {
        let path = root.join("usr/bin").join(bin);
        let help = run(Command::new(&path).arg("--help"));
        assert!(!help.is_empty(), "{bin} --help");
    }
    // The CNI plugin goes where Debian's runtimes look for plugins.
    let cni = run(Command::new(root.join("usr/lib/cni/tenet-cni")).arg("--help"));
    assert!(cni.contains("CNI_COMMAND"), "{cni}");
    for example in ["cn.yaml", "cnci.yaml", "scheduler.yaml", "datastore.yaml"] {
        assert!(
            root.join("usr/share/doc/tenet/examples")
                .join(example)
                .exists(),
            "{example} is not in the package"
        );
    }

    // systemd-analyze resolves the units' dependencies (sysinit.target, …) inside the root:
    // give it the machine's target units, then verify ours. A warning is a failure too.
    let units = root.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".target") {
            let _ = std::fs::copy(entry.path(), units.join(&name));
        }
    }
    for unit in [
        "tenet-scheduler.service",
        "tenet-cn.service",
        "tenet-cnci.service",
    ] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(units.join(unit))
            .output()
            .expect("systemd-analyze (Debian systemd)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }
}
