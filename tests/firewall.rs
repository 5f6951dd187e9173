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

/// The 1:1 NAT map: whole table first, differences later, repair after a change made by
/// hand, a clear error for a refused change, and nothing left after `delete`.
#[tokio::test]
async fn nat_map_in_nftables() {
    use tenet::net::firewall::NatMap;
    use tenet::net::firewall::natmap::Mappings;
    let ns = Netns::create("natmap").unwrap();
    let path = ns.path();
    let tables_before = ns.run(&["nft", "list", "tables"]).unwrap();
    let map = NatMap::new("TENET-T", "up0", Some(&path));
    let pair = |a: &str, b: &str| (a.parse().unwrap(), b.parse().unwrap());
    let mut want: Mappings = [pair("192.0.2.50", "172.16.0.5")].into();
    assert_eq!(map.read().await.unwrap(), None, "no table yet");
    map.apply(&want).await.unwrap();
    want.insert("192.0.2.51".parse().unwrap(), "172.16.0.6".parse().unwrap());
    map.apply(&want).await.unwrap();
    assert_eq!(map.read().await.unwrap().as_ref(), Some(&want));
    let listed = ns.run(&["nft", "list", "table", "ip", "tenet-t"]).unwrap();
    assert!(listed.contains("172.16.0.6 : 192.0.2.51"), "{listed}");
    assert!(listed.contains("oifname \"up0\" snat"), "{listed}");

    // Behind its back: an element deleted, one added.
    ns.run(&["nft", "delete element ip tenet-t dnat_in { 192.0.2.50 }"])
        .unwrap();
    ns.run(&[
        "nft",
        "add element ip tenet-t dnat_in { 192.0.2.99 : 172.16.0.9 }",
    ])
    .unwrap();
    let drift = map.reconcile(&want).await.unwrap();
    assert_eq!(drift.restored, ["floating 192.0.2.50 -> 172.16.0.5"]);
    assert_eq!(drift.removed, ["floating 192.0.2.99 -> 172.16.0.9"]);
    assert_eq!(map.read().await.unwrap().as_ref(), Some(&want));

    // A change the kernel refuses (the table vanished under a diff) is repaired by
    // replacing the table; an interface name nft cannot take is an error that says so.
    ns.run(&["nft", "delete", "table", "ip", "tenet-t"])
        .unwrap();
    want.remove(&"192.0.2.51".parse().unwrap());
    map.apply(&want).await.unwrap();
    assert_eq!(map.read().await.unwrap().as_ref(), Some(&want));
    let bad = NatMap::new("TENET-T", "up\"0", Some(&path));
    match bad.replace(&want).await {
        Err(FirewallError::Rejected { program, .. }) => assert_eq!(program, "nft"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        map.read().await.unwrap().as_ref(),
        Some(&want),
        "a refused replacement leaves the table as it was"
    );

    map.delete().await.unwrap();
    map.delete().await.unwrap();
    assert_eq!(ns.run(&["nft", "list", "tables"]).unwrap(), tables_before);
}
