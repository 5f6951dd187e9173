//! `tenet::net::firewall` against real iptables (nft and legacy) and ipset in a namespace:
//! owned chains and jumps, repair of changes made behind its back, rejected batches that
//! apply nothing, and removal that leaves `iptables-save` and `ipset list` as they were.

use tenet::net::firewall::{Firewall, FirewallError, IpSet, IptablesVariant, Rule, Ruleset, Table};
use tenet::testbed::Netns;

/// iptables-save without its timestamps and counters, for comparisons.
fn normalized(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(" [") {
            Some((chain, _)) if l.starts_with(':') => chain.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ruleset(extra_forward: bool) -> Ruleset {
    let mut r = Ruleset::new("TENET-T");
    let pre = r.chain(Table::Nat, "PRE", "PREROUTING");
    r.push(
        Table::Nat,
        &pre,
        Rule::new(
            "forward tcp 2222",
            [
                "-d",
                "192.0.2.1/32",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "2222",
                "-j",
                "DNAT",
                "--to-destination",
                "172.16.0.5:22",
            ],
        ),
    );
    let post = r.chain(Table::Nat, "POST", "POSTROUTING");
    r.push(
        Table::Nat,
        &post,
        Rule::new(
            "nat out 172.16.0.0/24",
            ["-s", "172.16.0.0/24", "-o", "eth0", "-j", "MASQUERADE"],
        ),
    );
    let fwd = r.chain(Table::Filter, "FWD", "FORWARD");
    r.push(
        Table::Filter,
        &fwd,
        Rule::new(
            "tenant sources",
            [
                "-m",
                "set",
                "--match-set",
                "TENET-T-SRC",
                "src",
                "-j",
                "ACCEPT",
            ],
        ),
    );
    if extra_forward {
        r.push(
            Table::Filter,
            &fwd,
            Rule::new("drop the rest", ["-j", "DROP"]),
        );
    }
    r.sets.push(IpSet {
        name: "TENET-T-SRC".into(),
        kind: "hash:net".into(),
        members: vec!["172.16.0.0/24".into(), "10.9.0.0/16".into()],
    });
    r
}

async fn scenario(variant: IptablesVariant) {
    let ns = Netns::create("fw").unwrap();
    let ipt = match variant {
        IptablesVariant::Nft => "iptables-nft",
        IptablesVariant::Legacy => "iptables-legacy",
    };
    // Someone else's rules, which tenet must never touch.
    ns.run(&[
        ipt,
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth9",
        "-j",
        "MASQUERADE",
    ])
    .unwrap();
    ns.run(&[ipt, "-N", "OTHER"]).unwrap();
    ns.run(&[ipt, "-A", "FORWARD", "-j", "OTHER"]).unwrap();
    ns.run(&["ipset", "create", "someone-else", "hash:ip"])
        .unwrap();
    let fw = Firewall::new(Some(&ns.path()), Some(variant))
        .await
        .unwrap();
    let before = normalized(&fw.save().await.unwrap());
    let sets_before = ns.run(&["ipset", "list", "-n"]).unwrap();

    let drift = fw.apply(&ruleset(false)).await.unwrap();
    assert!(drift.removed.is_empty(), "{drift:?}");
    let save = fw.save().await.unwrap();
    for want in [
        "-A PREROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-PRE",
        "-A POSTROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-POST",
        "-A FORWARD -m comment --comment \"TENET-T: entry\" -j TENET-T-FWD",
        "--comment \"TENET-T: nat out 172.16.0.0/24\" -j MASQUERADE",
        "--comment \"TENET-T: forward tcp 2222\" -j DNAT --to-destination 172.16.0.5:22",
        "-A POSTROUTING -o eth9 -j MASQUERADE",
    ] {
        assert!(save.contains(want), "{ipt}: missing {want}\n{save}");
    }
    assert_eq!(save.matches("-j TENET-T-POST").count(), 1);
    // Jumps go first in their built-in chain.
    let post = save
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING"))
        .collect::<Vec<_>>();
    assert!(post[0].contains("TENET-T-POST"), "{post:?}");

    // The same again is a no-op; a change touches only its chain.
    assert!(fw.apply(&ruleset(false)).await.unwrap().is_empty());
    fw.apply(&ruleset(true)).await.unwrap();
    assert!(
        fw.save()
            .await
            .unwrap()
            .contains("TENET-T: drop the rest\" -j DROP")
    );

    // Behind tenet's back: one of its rules deleted, a stranger in its chain, a second jump.
    ns.run(&[ipt, "-t", "nat", "-D", "TENET-T-POST", "1"])
        .unwrap();
    ns.run(&[ipt, "-t", "nat", "-A", "TENET-T-PRE", "-j", "ACCEPT"])
        .unwrap();
    ns.run(&[
        ipt,
        "-A",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "TENET-T: entry",
        "-j",
        "TENET-T-FWD",
    ])
    .unwrap();
    // A restarted agent: a new Firewall reconciles on its first apply.
    let fw = Firewall::new(Some(&ns.path()), Some(variant))
        .await
        .unwrap();
    let drift = fw.apply(&ruleset(true)).await.unwrap();
    assert_eq!(
        drift.restored,
        ["nat TENET-T-POST: TENET-T: nat out 172.16.0.0/24"],
        "{drift:?}"
    );
    assert_eq!(drift.removed.len(), 2, "{drift:?}");
    let repaired = fw.save().await.unwrap();
    assert_eq!(repaired.matches("-j TENET-T-FWD").count(), 1);
    assert!(repaired.contains("TENET-T: nat out 172.16.0.0/24"));
    assert!(!repaired.contains("-A TENET-T-PRE -j ACCEPT"));

    // A batch the kernel refuses: an error naming the line, and nothing of it applied.
    let mut bad = ruleset(true);
    let fwd = bad.chain_name("FWD");
    bad.push(
        Table::Filter,
        &fwd,
        Rule::new("broken", ["-j", "NO-SUCH-TARGET"]),
    );
    let pre = bad.chain_name("PRE");
    bad.set_rules(Table::Nat, &pre, Default::default());
    let fresh = Firewall::new(Some(&ns.path()), Some(variant))
        .await
        .unwrap();
    match fresh.apply(&bad).await {
        Err(FirewallError::Rejected { message, line, .. }) => {
            assert!(
                message.contains("NO-SUCH-TARGET")
                    || line
                        .as_deref()
                        .is_some_and(|l| l.contains("NO-SUCH-TARGET")),
                "{message} / {line:?}"
            );
            assert!(line.is_some_and(|l| l.contains("NO-SUCH-TARGET")));
        }
        other => panic!("{ipt}: expected a rejected batch, got {other:?}"),
    }
    assert_eq!(
        normalized(&fw.save().await.unwrap()),
        normalized(&repaired),
        "{ipt}: nothing of the refused batch applied (the nat table is untouched too)"
    );

    // Removal leaves everything as it was before tenet came.
    fw.remove("TENET-T").await.unwrap();
    assert_eq!(normalized(&fw.save().await.unwrap()), before, "{ipt}");
    assert_eq!(ns.run(&["ipset", "list", "-n"]).unwrap(), sets_before);
}

#[tokio::test]
async fn owned_chains_with_iptables_nft() {
    scenario(IptablesVariant::Nft).await;
}

#[tokio::test]
async fn owned_chains_with_iptables_legacy() {
    scenario(IptablesVariant::Legacy).await;
}
