//! 1:1 NAT (floating IPs) as two nftables maps in a table the owner has to itself.
//!
//! With iptables-nft every `iptables-restore` reads the whole rule cache back and commits a
//! transaction that replaces rules (~15 ms a change, more with many rules). Here the rules
//! never change: one DNAT rule looks the destination up in `dnat_in`, one SNAT rule the
//! source in `snat_out`, and a mapping is one small `nft` transaction that adds or deletes
//! two map elements. The chains hook in just before iptables' nat chains (priority
//! dstnat/srcnat − 10), so a floating IP wins over a port forward of the same address and
//! its SNAT over the uplink's masquerade, as with the iptables rules it replaces.
//!
//! Like [`super::Firewall`]: the first change (and any after a failure) replaces the whole
//! table in one transaction, repairing whatever was changed behind tenet's back; later
//! changes are differences. [`NatMap::delete`] leaves no table behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, info, warn};

use super::FirewallError;
use crate::process::{Command, ProcessError};

/// public address → private address.
pub type Mappings = BTreeMap<Ipv4Addr, Ipv4Addr>;

/// One owner's 1:1 NAT table in one network namespace.
pub struct NatMap {
    /// The nftables table (family `ip`), e.g. `tenet-cnci`.
    table: String,
    /// Only traffic leaving through this interface gets its floating source address.
    uplink: String,
    netns: Option<PathBuf>,
    applied: Mutex<Option<Mappings>>,
}

impl NatMap {
    /// A map for `owner` (e.g. `TENET-CNCI` → table `tenet-cnci`) whose SNAT applies to
    /// traffic out of `uplink`.
    pub fn new(owner: &str, uplink: &str, netns: Option<&Path>) -> Self {
        NatMap {
            table: owner.to_ascii_lowercase(),
            uplink: uplink.to_string(),
            netns: netns.map(Path::to_path_buf),
            applied: Mutex::new(None),
        }
    }

    /// Whether nftables can be driven here (the `nft` program exists and the kernel answers).
    pub async fn available(netns: Option<&Path>) -> bool {
        Command::new("nft")
            .args(["list", "tables"])
            .netns(netns)
            .run()
            .await
            .is_ok()
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, Option<Mappings>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the table's mappings exactly `desired`: the whole table the first time (and
    /// after a failure), the difference later.
    pub async fn apply(&self, desired: &Mappings) -> Result<(), FirewallError> {
        let last = self.applied().clone();
        let Some(old) = last else {
            return self.replace(desired).await;
        };
        let script = self.diff(&old, desired);
        if script.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.run(&script).await {
            warn!(table = %self.table, error = %e, "nftables: a map change was refused; replacing the table");
            *self.applied() = None;
            self.replace(desired).await?;
            return Ok(());
        }
        debug!(table = %self.table, mappings = desired.len(), "nftables map change applied");
        *self.applied() = Some(desired.clone());
        Ok(())
    }

    /// Replaces the table with one holding `desired`, in one transaction: traffic sees the
    /// old table or the new one, never none.
    pub async fn replace(&self, desired: &Mappings) -> Result<(), FirewallError> {
        *self.applied() = None;
        let script = format!(
            "table ip {t}\ndelete table ip {t}\n{}",
            self.definition(desired),
            t = self.table
        );
        self.run(&script).await?;
        info!(table = %self.table, mappings = desired.len(), "nftables 1:1 NAT table in place");
        *self.applied() = Some(desired.clone());
        Ok(())
    }

    /// After a restart: replaces the table with `desired` and says what differed from the
    /// kernel's (mappings deleted or added behind tenet's back, or no table at all).
    pub async fn reconcile(&self, desired: &Mappings) -> Result<super::Drift, FirewallError> {
        let found = self.read().await?;
        let mut drift = super::Drift::default();
        match &found {
            None => drift
                .restored
                .push(format!("nftables table {}", self.table)),
            Some(found) => {
                for (public, private) in desired {
                    if found.get(public) != Some(private) {
                        drift
                            .restored
                            .push(format!("floating {public} -> {private}"));
                    }
                }
                for (public, private) in found {
                    if desired.get(public) != Some(private) {
                        drift
                            .removed
                            .push(format!("floating {public} -> {private}"));
                    }
                }
            }
        }
        for d in &drift.restored {
            warn!(table = %self.table, what = %d, "nftables: restored");
        }
        for d in &drift.removed {
            warn!(table = %self.table, what = %d, "nftables: removed");
        }
        // The chains are rewritten too, whatever happened to them.
        self.replace(desired).await?;
        Ok(drift)
    }

    /// Removes the table (if there is one).
    pub async fn delete(&self) -> Result<(), FirewallError> {
        *self.applied() = None;
        // Declaring it first makes the delete succeed when there is nothing to delete.
        self.run(&format!(
            "table ip {t}\ndelete table ip {t}\n",
            t = self.table
        ))
        .await?;
        info!(table = %self.table, "nftables 1:1 NAT table removed");
        Ok(())
    }

    /// The mappings the kernel holds, or `None` when there is no table.
    pub async fn read(&self) -> Result<Option<Mappings>, FirewallError> {
        let out = Command::new("nft")
            .args(["-j", "list", "map", "ip", &self.table, "dnat_in"])
            .netns(self.netns.as_deref())
            .run()
            .await;
        match out {
            Ok(out) => Ok(Some(parse_map_json(&out.stdout))),
            Err(ProcessError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The whole table, in nft's language.
    pub fn definition(&self, mappings: &Mappings) -> String {
        let elements = |pairs: Vec<(Ipv4Addr, Ipv4Addr)>| {
            if pairs.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} : {v}")).collect();
                format!(" elements = {{ {} }};", list.join(", "))
            }
        };
        let inbound = elements(mappings.iter().map(|(p, q)| (*p, *q)).collect());
        let outbound = elements(mappings.iter().map(|(p, q)| (*q, *p)).collect());
        let mut s = String::new();
        let _ = writeln!(s, "table ip {} {{", self.table);
        let _ = writeln!(
            s,
            "  comment \"{}: 1:1 NAT\"",
            self.table.to_ascii_uppercase()
        );
        let _ = writeln!(
            s,
            "  map dnat_in {{ type ipv4_addr : ipv4_addr;{inbound} }}"
        );
        let _ = writeln!(
            s,
            "  map snat_out {{ type ipv4_addr : ipv4_addr;{outbound} }}"
        );
        let _ = writeln!(
            s,
            "  chain prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; dnat to ip daddr map @dnat_in; }}"
        );
        let _ = writeln!(
            s,
            "  chain postrouting {{ type nat hook postrouting priority srcnat - 10; policy accept; oifname \"{}\" snat to ip saddr map @snat_out; }}",
            self.uplink
        );
        s.push_str("}\n");
        s
    }

    /// The element changes from `old` to `new` (deletes first: a public address may move).
    fn diff(&self, old: &Mappings, new: &Mappings) -> String {
        let mut s = String::new();
        let t = &self.table;
        for (public, private) in old {
            if new.get(public) != Some(private) {
                let _ = writeln!(s, "delete element ip {t} dnat_in {{ {public} }}");
                let _ = writeln!(s, "delete element ip {t} snat_out {{ {private} }}");
            }
        }
        for (public, private) in new {
            if old.get(public) != Some(private) {
                let _ = writeln!(s, "add element ip {t} dnat_in {{ {public} : {private} }}");
                let _ = writeln!(s, "add element ip {t} snat_out {{ {private} : {public} }}");
            }
        }
        s
    }

    async fn run(&self, script: &str) -> Result<(), FirewallError> {
        Command::new("nft")
            .args(["-f", "-"])
            .netns(self.netns.as_deref())
            .stdin(script)
            .run()
            .await
            .map_err(|e| nft_rejected(script, e))?;
        Ok(())
    }
}

/// nft names the failing line as `/dev/stdin:LINE:COLS: Error: …`.
fn nft_rejected(script: &str, e: ProcessError) -> FirewallError {
    match e {
        ProcessError::Failed { stderr, .. } => {
            let line = stderr
                .lines()
                .find(|l| l.contains("Error:"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| script.lines().nth(n.checked_sub(1)?))
                .map(str::to_string);
            let message = stderr
                .lines()
                .find(|l| l.contains("Error:"))
                .map(|l| l.split("Error:").nth(1).unwrap_or(l).trim().to_string())
                .unwrap_or_else(|| stderr.trim().to_string());
            FirewallError::Rejected {
                program: "nft".into(),
                message,
                line,
            }
        }
        other => FirewallError::Process(other),
    }
}

/// The elements of `nft -j list map …`: `{"nftables": [.., {"map": {"elem": [[k, v], ..]}}]}`.
fn parse_map_json(text: &str) -> Mappings {
    let mut out = Mappings::new();
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return out;
    };
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        for pair in item["map"]["elem"].as_array().into_iter().flatten() {
            let (Some(k), Some(v)) = (pair[0].as_str(), pair[1].as_str()) else {
                continue;
            };
            if let (Ok(k), Ok(v)) = (k.parse(), v.parse()) {
                out.insert(k, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> Mappings {
        pairs
            .iter()
            .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
            .collect()
    }

    #[test]
    fn the_table_maps_both_ways_and_snat_is_limited_to_the_uplink() {
        let map = NatMap::new("TENET-CNCI", "up0", None);
        let text = map.definition(&m(&[("192.0.2.50", "172.16.0.5")]));
        assert!(text.starts_with("table ip tenet-cnci {"), "{text}");
        assert!(text.contains(
            "map dnat_in { type ipv4_addr : ipv4_addr; elements = { 192.0.2.50 : 172.16.0.5 }; }"
        ));
        assert!(text.contains(
            "map snat_out { type ipv4_addr : ipv4_addr; elements = { 172.16.0.5 : 192.0.2.50 }; }"
        ));
        assert!(text.contains("oifname \"up0\" snat to ip saddr map @snat_out"));
        let empty = map.definition(&Mappings::new());
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn a_change_touches_only_the_difference_and_deletes_first() {
        let map = NatMap::new("TENET-CNCI", "up0", None);
        let old = m(&[("192.0.2.50", "172.16.0.5"), ("192.0.2.51", "172.16.0.6")]);
        let new = m(&[("192.0.2.50", "172.16.0.7"), ("192.0.2.51", "172.16.0.6")]);
        let diff = map.diff(&old, &new);
        assert_eq!(
            diff,
            "delete element ip tenet-cnci dnat_in { 192.0.2.50 }\n\
             delete element ip tenet-cnci snat_out { 172.16.0.5 }\n\
             add element ip tenet-cnci dnat_in { 192.0.2.50 : 172.16.0.7 }\n\
             add element ip tenet-cnci snat_out { 172.16.0.7 : 192.0.2.50 }\n"
        );
        assert!(map.diff(&new, &new).is_empty());
    }

    #[test]
    fn listed_elements_are_read_back() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip", "name": "dnat_in", "table": "tenet-cnci", "type": "ipv4_addr", "handle": 1, "map": "ipv4_addr", "elem": [["192.0.2.50", "172.16.0.5"]]}}]}"#;
        assert_eq!(parse_map_json(text), m(&[("192.0.2.50", "172.16.0.5")]));
        assert!(parse_map_json("not json").is_empty());
    }

    #[test]
    fn a_refusal_names_the_line() {
        let script = "table ip t\nadd element ip t nope { 1.2.3.4 : 5.6.7.8 }\n";
        let e = nft_rejected(
            script,
            ProcessError::Failed {
                command: "nft -f -".into(),
                status: "exit status: 1".into(),
                stderr: "/dev/stdin:2:1-43: Error: Could not process rule: No such file or directory\nadd element …\n^^^^".into(),
            },
        );
        match e {
            FirewallError::Rejected { message, line, .. } => {
                assert_eq!(message, "Could not process rule: No such file or directory");
                assert_eq!(
                    line.as_deref(),
                    Some("add element ip t nope { 1.2.3.4 : 5.6.7.8 }")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
