//! The desired state of one owner's firewall: its chains (each rule carrying a comment that
//! names its owner and object), the jumps into them from the built-in chains, and its IP sets.
//! Pure: rendering into `iptables-restore` and `ipset restore` text, no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Nat,
    Mangle,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Raw, Table::Mangle, Table::Nat, Table::Filter];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
            Table::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether `chain` is one of this table's built-in chains.
    pub fn is_builtin(self, chain: &str) -> bool {
        let builtins: &[&str] = match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            Table::Raw => &["PREROUTING", "OUTPUT"],
        };
        builtins.contains(&chain)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule: its match and target arguments (as for `iptables -A CHAIN …`) and the object it
/// is for, which goes into its comment (`<owner>: <object>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub args: Vec<String>,
    pub object: String,
}

impl Rule {
    pub fn new<I, S>(object: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Rule {
            args: args.into_iter().map(Into::into).collect(),
            object: object.into(),
        }
    }
}

/// A jump from a built-in chain into one of the owner's chains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    pub table: Table,
    /// The built-in chain (`PREROUTING`, `FORWARD`, …).
    pub from: String,
    /// The owner's chain.
    pub to: String,
}

/// An IP set (`ipset`) the owner's rules match on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpSet {
    pub name: String,
    /// `hash:ip`, `hash:net`, …
    pub kind: String,
    pub members: Vec<String>,
}

/// Everything one owner (e.g. `TENET-CNCI`) wants installed. Every chain name starts with
/// the owner, so that chains of the owner can be found in `iptables-save` and nothing else is
/// ever touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub owner: String,
    /// Shared, so that a large chain rendered once (65,536 port forwards) costs nothing to
    /// keep, clone and compare while other chains change.
    pub chains: BTreeMap<(Table, String), Arc<Vec<Rule>>>,
    pub jumps: Vec<Jump>,
    pub sets: Vec<IpSet>,
}

impl Ruleset {
    pub fn new(owner: &str) -> Self {
        Ruleset {
            owner: owner.to_string(),
            ..Ruleset::default()
        }
    }

    /// `<owner>-<suffix>`: a chain name of this owner.
    pub fn chain_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.owner)
    }

    /// Declares a chain (empty until rules are added) entered from `from` by one jump, at
    /// the top of the built-in chain.
    pub fn chain(&mut self, table: Table, suffix: &str, from: &str) -> String {
        let name = self.chain_name(suffix);
        self.chains.entry((table, name.clone())).or_default();
        let jump = Jump {
            table,
            from: from.to_string(),
            to: name.clone(),
        };
        if !self.jumps.contains(&jump) {
            self.jumps.push(jump);
        }
        name
    }

    pub fn push(&mut self, table: Table, chain: &str, rule: Rule) {
        Arc::make_mut(self.chains.entry((table, chain.to_string())).or_default()).push(rule);
    }

    /// Sets a chain's rules to a list rendered before (and shared).
    pub fn set_rules(&mut self, table: Table, chain: &str, rules: Arc<Vec<Rule>>) {
        self.chains.insert((table, chain.to_string()), rules);
    }

    /// The rules of a chain, shared.
    pub fn rules(&self, table: Table, chain: &str) -> Option<&Arc<Vec<Rule>>> {
        self.chains.get(&(table, chain.to_string()))
    }

    /// The comment a rule of this owner carries.
    pub fn comment(&self, object: &str) -> String {
        // Quotes would end the comment in the restore format, a line break the line.
        let object: String = object
            .chars()
            .map(|c| match c {
                '"' => '\'',
                c if c.is_control() => ' ',
                c => c,
            })
            .collect();
        format!("{}: {object}", self.owner)
    }

    /// The comment of the owner's jumps.
    pub fn jump_comment(&self) -> String {
        format!("{}: entry", self.owner)
    }

    /// The `-A …` line of one rule: its matches, the comment, then its target (the order
    /// `iptables-save` prints).
    pub fn rule_line(&self, chain: &str, rule: &Rule) -> String {
        let target = rule
            .args
            .iter()
            .position(|a| a == "-j" || a == "-g")
            .unwrap_or(rule.args.len());
        let mut line = format!("-A {chain}");
        for a in &rule.args[..target] {
            line.push(' ');
            line.push_str(&quote(a));
        }
        line.push_str(&format!(
            " -m comment --comment \"{}\"",
            self.comment(&rule.object)
        ));
        for a in &rule.args[target..] {
            line.push(' ');
            line.push_str(&quote(a));
        }
        line
    }

    /// The rule spec of a jump (without `-A`/`-I`/`-D CHAIN`).
    pub fn jump_spec(&self, jump: &Jump) -> String {
        format!(
            "-m comment --comment \"{}\" -j {}",
            self.jump_comment(),
            jump.to
        )
    }

    pub fn tables(&self) -> Vec<Table> {
        let mut t: Vec<Table> = self
            .chains
            .keys()
            .map(|(t, _)| *t)
            .chain(self.jumps.iter().map(|j| j.table))
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// Rules of the owner, counted by object, in one table and chain.
    pub fn objects(&self, table: Table, chain: &str) -> Vec<String> {
        self.chains
            .get(&(table, chain.to_string()))
            .map(|rules| rules.iter().map(|r| self.comment(&r.object)).collect())
            .unwrap_or_default()
    }

    /// The `ipset restore` text that makes the sets exactly as wanted.
    pub fn ipset_text(&self) -> String {
        let mut out = String::new();
        for s in &self.sets {
            out.push_str(&format!("create {} {} -exist\n", s.name, s.kind));
            out.push_str(&format!("flush {}\n", s.name));
            for m in &s.members {
                out.push_str(&format!("add {} {m}\n", s.name));
            }
        }
        out
    }
}

/// An argument as the restore format wants it: quoted when it holds spaces.
fn quote(arg: &str) -> String {
    if arg.contains(char::is_whitespace) {
        format!("\"{}\"", arg.replace('"', "'"))
    } else {
        arg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_with_their_owner_and_object() {
        let mut r = Ruleset::new("TENET-CNCI");
        let pre = r.chain(Table::Nat, "PRE", "PREROUTING");
        assert_eq!(pre, "TENET-CNCI-PRE");
        r.push(
            Table::Nat,
            &pre,
            Rule::new(
                "forward tcp 2222 to 172.16.0.5:22",
                [
                    "-p",
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
        let line = r.rule_line(&pre, &r.chains[&(Table::Nat, pre.clone())][0]);
        assert_eq!(
            line,
            "-A TENET-CNCI-PRE -p tcp --dport 2222 \
             -m comment --comment \"TENET-CNCI: forward tcp 2222 to 172.16.0.5:22\" \
             -j DNAT --to-destination 172.16.0.5:22"
        );
        assert_eq!(r.jumps.len(), 1);
        r.chain(Table::Nat, "PRE", "PREROUTING");
        assert_eq!(r.jumps.len(), 1, "declared twice, jumped to once");
        assert_eq!(r.tables(), [Table::Nat]);
        assert_eq!(r.comment("say \"hi\""), "TENET-CNCI: say 'hi'");
        assert_eq!(r.comment("two\nlines"), "TENET-CNCI: two lines");
        assert!(Table::Nat.is_builtin("POSTROUTING") && !Table::Filter.is_builtin("PRE"));
    }
}
