//! From what `iptables-save` shows (or what was applied last) and what is wanted, the one
//! `iptables-restore --noflush` batch that gets there, touching only the owner's chains and
//! the jumps into them. Pure.

use std::collections::{BTreeMap, BTreeSet};

use super::ruleset::{Ruleset, Table};

/// One table of an `iptables-save` dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: Vec<String>,
    /// (chain, the rule line as printed, `-A CHAIN …`).
    pub rules: Vec<(String, String)>,
}

/// An `iptables-save` dump, by table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: BTreeMap<Table, SavedTable>,
}

impl Saved {
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        let mut current: Option<Table> = None;
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                current = Table::parse(t.trim());
                if let Some(t) = current {
                    saved.tables.entry(t).or_default();
                }
                continue;
            }
            let Some(t) = current else { continue };
            let table = saved.tables.entry(t).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ")
                && let Some(chain) = rest.split_whitespace().next()
            {
                table.rules.push((chain.to_string(), line.to_string()));
            }
        }
        saved
    }

    /// The owner's chains in `table`.
    pub fn owned_chains(&self, table: Table, owner: &str) -> Vec<String> {
        let prefix = format!("{owner}-");
        self.tables
            .get(&table)
            .map(|t| {
                t.chains
                    .iter()
                    .filter(|c| c.starts_with(&prefix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The comments of the rules of `chain`; a rule without one (someone else's, added to
    /// an owned chain) stands as its whole line.
    pub fn comments(&self, table: Table, chain: &str) -> Vec<String> {
        self.tables
            .get(&table)
            .map(|t| {
                t.rules
                    .iter()
                    .filter(|(c, _)| c == chain)
                    .map(|(_, line)| comment_of(line).unwrap_or_else(|| line.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The owner's jumps in the built-in chains of `table`: (chain, 1-based position in that
/// chain, the rule line), in chain order.
fn owner_jumps(saved: &Saved, table: Table, owner: &str) -> Vec<(String, usize, String)> {
    let Some(t) = saved.tables.get(&table) else {
        return Vec::new();
    };
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (chain, line) in &t.rules {
        let pos = seen.entry(chain).or_default();
        *pos += 1;
        if table.is_builtin(chain) && targets_owner(line, owner) {
            out.push((chain.clone(), *pos, line.clone()));
        }
    }
    out
}

/// `-D` lines for jumps, by position, bottom-up so that earlier positions stay valid.
fn delete_by_position(doomed: &mut [(String, usize)]) -> String {
    doomed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    doomed
        .iter()
        .map(|(chain, pos)| format!("-D {chain} {pos}\n"))
        .collect()
}

/// The text of a rule's `--comment`, if it has one.
pub fn comment_of(line: &str) -> Option<String> {
    let rest = &line[line.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next().map(str::to_string)
    } else {
        rest.split_whitespace().next().map(str::to_string)
    }
}

/// What a full reconciliation found different from what is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Rules, chains and jumps that were missing and are put back.
    pub restored: Vec<String>,
    /// Rules, chains and jumps that were not wanted and are removed.
    pub removed: Vec<String>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.restored.is_empty() && self.removed.is_empty()
    }
}

/// The batch, one text per table (in `Table::ALL` order), that makes the owner's part of
/// `saved` exactly `desired`, and what differed. Every owned chain is rewritten; chains of
/// the owner that are not wanted are flushed and deleted with their jumps; a wanted jump that
/// is missing is inserted at the top of its built-in chain, a duplicate is deleted. Nothing
/// else in `saved` is touched.
pub fn full(desired: &Ruleset, saved: &Saved) -> (Vec<(Table, String)>, Drift) {
    let owner = &desired.owner;
    let mut drift = Drift::default();
    let mut out = Vec::new();
    for table in Table::ALL {
        let wanted: Vec<&String> = desired
            .chains
            .keys()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| c)
            .collect();
        let present = saved.owned_chains(table, owner);
        let stale: Vec<&String> = present.iter().filter(|c| !wanted.contains(c)).collect();
        let jumps: Vec<_> = desired.jumps.iter().filter(|j| j.table == table).collect();
        // Existing jumps into the owner's chains, from any built-in chain.
        let existing = owner_jumps(saved, table, owner);
        if wanted.is_empty() && stale.is_empty() && existing.is_empty() && jumps.is_empty() {
            continue;
        }

        let mut text = format!("*{table}\n");
        for c in wanted.iter().copied().chain(stale.iter().copied()) {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        // Jumps: keep the first exact copy of each wanted one, delete everything else (by
        // position: `-D` by spec would take the first of two identical copies).
        let mut kept = BTreeSet::new();
        let mut doomed = Vec::new();
        for (chain, pos, line) in &existing {
            let spec = line
                .strip_prefix(&format!("-A {chain} "))
                .unwrap_or_default()
                .to_string();
            let wanted_jump = jumps
                .iter()
                .any(|j| j.from == *chain && desired.jump_spec(j) == spec);
            if wanted_jump && kept.insert((chain.clone(), spec.clone())) {
                continue;
            }
            doomed.push((chain.clone(), *pos));
            drift.removed.push(format!("{table} {chain}: {spec}"));
        }
        text.push_str(&delete_by_position(&mut doomed));
        for j in &jumps {
            let spec = desired.jump_spec(j);
            if !kept.contains(&(j.from.clone(), spec.clone())) {
                text.push_str(&format!("-I {} 1 {spec}\n", j.from));
                drift
                    .restored
                    .push(format!("{table} {}: jump to {}", j.from, j.to));
            }
        }
        for c in &wanted {
            let rules = &desired.chains[&(table, (*c).clone())];
            for r in rules.iter() {
                text.push_str(&desired.rule_line(c, r));
                text.push('\n');
            }
            if present.contains(c) {
                let (missing, extra) =
                    compare(&desired.objects(table, c), &saved.comments(table, c));
                drift
                    .restored
                    .extend(missing.into_iter().map(|m| format!("{table} {c}: {m}")));
                drift
                    .removed
                    .extend(extra.into_iter().map(|m| format!("{table} {c}: {m}")));
            } else {
                drift.restored.push(format!("{table} chain {c}"));
            }
        }
        for c in &stale {
            text.push_str(&format!("-X {c}\n"));
            drift.removed.push(format!("{table} chain {c}"));
        }
        text.push_str("COMMIT\n");
        out.push((table, text));
    }
    (out, drift)
}

/// The batch from `old` (applied last, so known to be in place) to `new`: only the chains
/// whose rules changed are rewritten, and only the jumps that changed are touched. No
/// `iptables-save` needed, so a small change costs the same with 65,536 other rules.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Vec<(Table, String)> {
    let mut out = Vec::new();
    for table in Table::ALL {
        let mut text = String::new();
        let chains_of = |r: &Ruleset| -> BTreeSet<String> {
            r.chains
                .keys()
                .filter(|(t, _)| *t == table)
                .map(|(_, c)| c.clone())
                .collect()
        };
        let (before, after) = (chains_of(old), chains_of(new));
        for c in &after {
            let changed =
                old.chains.get(&(table, c.clone())) != new.chains.get(&(table, c.clone()));
            if changed {
                text.push_str(&format!(":{c} - [0:0]\n"));
            }
        }
        for c in before.difference(&after) {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for j in old.jumps.iter().filter(|j| j.table == table) {
            if !new.jumps.contains(j) {
                text.push_str(&format!("-D {} {}\n", j.from, old.jump_spec(j)));
            }
        }
        for j in new.jumps.iter().filter(|j| j.table == table) {
            if !old.jumps.contains(j) {
                text.push_str(&format!("-I {} 1 {}\n", j.from, new.jump_spec(j)));
            }
        }
        for c in &after {
            let key = (table, c.clone());
            if !same(old.chains.get(&key), new.chains.get(&key)) {
                for r in new.chains[&key].iter() {
                    text.push_str(&new.rule_line(c, r));
                    text.push('\n');
                }
            }
        }
        for c in before.difference(&after) {
            text.push_str(&format!("-X {c}\n"));
        }
        if !text.is_empty() {
            out.push((table, format!("*{table}\n{text}COMMIT\n")));
        }
    }
    out
}

/// The batch that puts the owner's part back as it was in `before`, from `now`: for undoing a
/// batch that the kernel refused half-way (iptables commits table by table, and
/// iptables-nft's dry run does not check everything the kernel checks).
pub fn rollback(before: &Saved, now: &Saved, owner: &str) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let (was, is) = (
            before.owned_chains(table, owner),
            now.owned_chains(table, owner),
        );
        let jumps_now = owner_jumps(now, table, owner);
        let jumps_before = owner_jumps(before, table, owner);
        if was.is_empty() && is.is_empty() && jumps_now.is_empty() && jumps_before.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for c in was.iter().chain(is.iter().filter(|c| !was.contains(c))) {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        let mut doomed: Vec<(String, usize)> =
            jumps_now.iter().map(|(c, p, _)| (c.clone(), *p)).collect();
        out.push_str(&delete_by_position(&mut doomed));
        // Back where they were: ascending positions rebuild the old order.
        for (chain, pos, line) in &jumps_before {
            let spec = line
                .strip_prefix(&format!("-A {chain} "))
                .unwrap_or_default();
            out.push_str(&format!("-I {chain} {pos} {spec}\n"));
        }
        if let Some(t) = before.tables.get(&table) {
            for (chain, line) in &t.rules {
                if was.contains(chain) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        for c in is.iter().filter(|c| !was.contains(c)) {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Whether two versions of a chain hold the same rules (the same shared list, cheaply).
fn same(
    a: Option<&std::sync::Arc<Vec<super::ruleset::Rule>>>,
    b: Option<&std::sync::Arc<Vec<super::ruleset::Rule>>>,
) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

/// Whether a rule line jumps (or goes) to one of the owner's chains.
fn targets_owner(line: &str, owner: &str) -> bool {
    let prefix = format!("{owner}-");
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(&prefix))
}

/// (wanted but absent, present but unwanted), as multisets.
fn compare(wanted: &[String], present: &[String]) -> (Vec<String>, Vec<String>) {
    let mut left: Vec<String> = present.to_vec();
    let mut missing = Vec::new();
    for w in wanted {
        match left.iter().position(|p| p == w) {
            Some(i) => {
                left.remove(i);
            }
            None => missing.push(w.clone()),
        }
    }
    (missing, left)
}

#[cfg(test)]
mod tests {
    use super::super::ruleset::Rule;
    use super::*;

    fn desired() -> Ruleset {
        let mut r = Ruleset::new("TENET-T");
        let post = r.chain(Table::Nat, "POST", "POSTROUTING");
        r.push(
            Table::Nat,
            &post,
            Rule::new(
                "masquerade 172.16.0.0/24",
                ["-s", "172.16.0.0/24", "-j", "MASQUERADE"],
            ),
        );
        r
    }

    const SAVED: &str = "*nat\n\
:PREROUTING ACCEPT [0:0]\n\
:POSTROUTING ACCEPT [0:0]\n\
:TENET-T-POST - [0:0]\n\
:TENET-T-OLD - [0:0]\n\
:OTHER - [0:0]\n\
-A POSTROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-POST\n\
-A POSTROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-POST\n\
-A PREROUTING -j TENET-T-OLD\n\
-A POSTROUTING -o eth0 -j MASQUERADE\n\
-A TENET-T-POST -s 10.0.0.0/8 -m comment --comment \"TENET-T: stale one\" -j MASQUERADE\n\
-A OTHER -j ACCEPT\n\
COMMIT\n";

    #[test]
    fn a_full_batch_repairs_only_the_owners_part() {
        let saved = Saved::parse(SAVED);
        assert_eq!(
            saved.owned_chains(Table::Nat, "TENET-T"),
            ["TENET-T-POST", "TENET-T-OLD"]
        );
        let (batches, drift) = full(&desired(), &saved);
        assert_eq!(batches.len(), 1);
        let text = &batches[0].1;
        assert_eq!(
            text,
            "*nat\n\
:TENET-T-POST - [0:0]\n\
:TENET-T-OLD - [0:0]\n\
-D POSTROUTING 2\n\
-D PREROUTING 1\n\
-A TENET-T-POST -s 172.16.0.0/24 -m comment --comment \"TENET-T: masquerade 172.16.0.0/24\" -j MASQUERADE\n\
-X TENET-T-OLD\n\
COMMIT\n"
        );
        assert_eq!(
            drift.restored,
            ["nat TENET-T-POST: TENET-T: masquerade 172.16.0.0/24"]
        );
        assert_eq!(drift.removed.len(), 4, "{drift:?}");

        // Once in place, nothing differs.
        let after = "*nat\n:POSTROUTING ACCEPT [0:0]\n:TENET-T-POST - [0:0]\n\
-A POSTROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-POST\n\
-A TENET-T-POST -s 172.16.0.0/24 -m comment --comment \"TENET-T: masquerade 172.16.0.0/24\" -j MASQUERADE\n\
COMMIT\n";
        let (_, drift) = full(&desired(), &Saved::parse(after));
        assert!(drift.is_empty(), "{drift:?}");

        // Removal: an empty ruleset of the owner.
        let (batches, _) = full(&Ruleset::new("TENET-T"), &Saved::parse(after));
        assert_eq!(
            batches[0].1,
            "*nat\n:TENET-T-POST - [0:0]\n\
-D POSTROUTING 1\n\
-X TENET-T-POST\nCOMMIT\n"
        );
    }

    #[test]
    fn a_diff_touches_only_what_changed() {
        let old = desired();
        assert!(diff(&old, &old).is_empty());
        let mut new = old.clone();
        let pre = new.chain(Table::Nat, "PRE", "PREROUTING");
        new.push(
            Table::Nat,
            &pre,
            Rule::new(
                "fip",
                [
                    "-d",
                    "192.0.2.9/32",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "172.16.0.9",
                ],
            ),
        );
        let d = diff(&old, &new);
        assert_eq!(
            d[0].1,
            "*nat\n:TENET-T-PRE - [0:0]\n\
-I PREROUTING 1 -m comment --comment \"TENET-T: entry\" -j TENET-T-PRE\n\
-A TENET-T-PRE -d 192.0.2.9/32 -m comment --comment \"TENET-T: fip\" -j DNAT --to-destination 172.16.0.9\n\
COMMIT\n"
        );
        let back = diff(&new, &old);
        assert_eq!(
            back[0].1,
            "*nat\n:TENET-T-PRE - [0:0]\n\
-D PREROUTING -m comment --comment \"TENET-T: entry\" -j TENET-T-PRE\n\
-X TENET-T-PRE\nCOMMIT\n"
        );
        assert_eq!(
            comment_of("-A X -m comment --comment \"a b\" -j Y").as_deref(),
            Some("a b")
        );
        assert_eq!(
            comment_of("-A X -m comment --comment ab -j Y").as_deref(),
            Some("ab")
        );
    }
}
