//! Which links belong to which tenet component, so that each can rebuild its topology after a
//! crash and reset only its own links.
//!
//! The scheme, shared by the compute node and the concentrator:
//!
//! * every link a component makes has a **generated name** `<prefix>_<8 hex digits>` (12
//!   bytes, under IFNAMSIZ), with a prefix per object kind (`tbr` a compute-node bridge, …);
//! * its identity goes into its alias (`tenet:v1:<kind> …`, see [`super::alias`]), and the
//!   alias is written **last**, as the commit mark of a finished object;
//! * so a link with one of the component's generated names and **no alias** is a create a
//!   crash interrupted: rebuild and reset delete it;
//! * reset deletes the component's links only: its alias kinds and its unfinished names.
//!   Links of other components, and foreign aliased links, stay.

use std::collections::HashSet;

use super::alias::Alias;
use super::link::{Link, Netlink};
use super::{NetError, NetResult};

/// Length of the random suffix of a generated name.
const SUFFIX_LEN: usize = 8;
/// Fresh names tried before giving up (a clash is a 1-in-2³² event per existing link).
const NAME_ATTEMPTS: usize = 8;

/// One component's ownership scheme: the name prefixes it generates and the alias kinds it
/// writes.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    /// Who this is, for messages (`compute node`, `concentrator`).
    pub component: &'static str,
    /// Prefixes of the links the component owns outright (a veth's peer end is not listed:
    /// it always goes with its host end).
    pub prefixes: &'static [&'static str],
    /// Alias kinds the component writes.
    pub kinds: &'static [&'static str],
}

/// What a link is to one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    /// Carries one of the component's alias kinds: a finished object.
    Finished(Alias),
    /// One of the component's generated names without a tenet alias: an interrupted create.
    Unfinished,
    /// Anything else, other tenet components' links included.
    Foreign,
}

impl Ownership {
    /// A random name `<prefix>_xxxxxxxx`; not checked against the kernel (see
    /// [`Ownership::fresh_name`]).
    pub fn random_name(prefix: &str) -> String {
        format!("{prefix}_{:08x}", rand::random::<u32>())
    }

    /// A generated name no link in `netlink`'s namespace has yet. The kernel still has the
    /// last word (a create with a name taken meanwhile fails with EEXIST and rolls back).
    pub async fn fresh_name(&self, netlink: &Netlink, prefix: &str) -> NetResult<String> {
        debug_assert!(self.prefixes.contains(&prefix), "{prefix} is not ours");
        for _ in 0..NAME_ATTEMPTS {
            let name = Self::random_name(prefix);
            if netlink.link_by_name(&name).await?.is_none() {
                return Ok(name);
            }
        }
        Err(NetError::invalid(
            "name",
            format!("a {prefix}_ link"),
            "every generated name tried is taken",
        ))
    }

    /// Whether `name` is one this component generates for a link it owns outright.
    pub fn is_generated(&self, name: &str) -> bool {
        let Some((prefix, suffix)) = name.split_once('_') else {
            return false;
        };
        self.prefixes.contains(&prefix)
            && suffix.len() == SUFFIX_LEN
            && suffix
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    /// Whether `name` is a generated name with this prefix.
    pub fn is_generated_as(&self, name: &str, prefix: &str) -> bool {
        self.is_generated(name) && name.split_once('_').is_some_and(|(p, _)| p == prefix)
    }

    /// What `link` is to this component.
    pub fn classify(&self, link: &Link) -> Owned {
        match tenet_alias(link) {
            Some(a) if self.kinds.contains(&a.kind.as_str()) => Owned::Finished(a),
            Some(_) => Owned::Foreign,
            None if self.is_generated(&link.name) => Owned::Unfinished,
            None => Owned::Foreign,
        }
    }

    /// The links reset deletes: the component's finished and unfinished links, plus those
    /// `also` claims (e.g. tunnels, whose alias kind is shared, enslaved to the component's
    /// bridges).
    pub fn reset_selection<'a>(
        &self,
        links: &'a [Link],
        also: impl Fn(&Link, &Alias) -> bool,
    ) -> Vec<&'a Link> {
        links
            .iter()
            .filter(|l| match self.classify(l) {
                Owned::Finished(_) | Owned::Unfinished => true,
                Owned::Foreign => tenet_alias(l).is_some_and(|a| also(l, &a)),
            })
            .collect()
    }

    /// Deletes `links` in one batch and checks that none is left; a link still present is
    /// an error naming it.
    pub async fn delete_all(&self, netlink: &Netlink, links: &[&Link]) -> NetResult<usize> {
        let indexes: Vec<u32> = links.iter().map(|l| l.index).collect();
        netlink.delete_many(&indexes).await?;
        let gone: HashSet<u32> = indexes.iter().copied().collect();
        let left: Vec<String> = netlink
            .links()
            .await?
            .into_iter()
            .filter(|l| gone.contains(&l.index))
            .map(|l| l.name)
            .collect();
        if !left.is_empty() {
            return Err(NetError::invalid(
                "reset",
                format!("{} links", self.component),
                format!("still present after deletion: {}", left.join(", ")),
            ));
        }
        Ok(indexes.len())
    }
}

/// Whether `name` has the shape of any tenet component's generated names (`t??_` + 8 hex):
/// such a link is tenet's even before its alias is written, so underlay discovery must never
/// take it for a physical link.
pub fn looks_generated(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4 + SUFFIX_LEN
        && b[0] == b't'
        && b[1].is_ascii_lowercase()
        && b[2].is_ascii_lowercase()
        && b[3] == b'_'
        && b[4..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// Writes `alias` on a finished link: the commit mark, always the last step of a create.
pub async fn commit(netlink: &Netlink, index: u32, alias: &Alias) -> NetResult<()> {
    netlink.set_alias(index, &alias.to_string()).await
}

/// The tenet alias a link carries, if any.
pub fn tenet_alias(link: &Link) -> Option<Alias> {
    Alias::parse(link.alias.as_deref()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CN: Ownership = Ownership {
        component: "test node",
        prefixes: &["tbr", "tgt"],
        kinds: &["cn-bridge"],
    };

    fn link(index: u32, name: &str, alias: Option<&str>, controller: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some("bridge".into()),
            alias: alias.map(str::to_string),
            controller,
            up: true,
            oper_state: "up".into(),
            mtu: 1500,
            mac: None,
            group: 0,
        }
    }

    #[test]
    fn generated_names_are_recognised() {
        for p in CN.prefixes {
            assert!(CN.is_generated(&Ownership::random_name(p)));
        }
        for other in [
            "eth0",
            "tbr_1234567",
            "tbr_123456789",
            "tbr_ABCDEF01",
            "xbr_12345678",
            "tvp_12345678",
        ] {
            assert!(!CN.is_generated(other), "{other}");
        }
        assert!(CN.is_generated_as("tgt_0123abcd", "tgt"));
        assert!(looks_generated("tcb_0123abcd") && looks_generated("tvp_0123abcd"));
        assert!(!looks_generated("eth0") && !looks_generated("tcb_0123abcg"));
        assert!(!CN.is_generated_as("tbr_0123abcd", "tgt"));
    }

    #[test]
    fn classification_and_reset_take_only_our_links() {
        let links = vec![
            link(1, "eth0", None, None),
            link(2, "tbr_0000000a", Some("tenet:v1:cn-bridge tenant=a"), None),
            link(3, "tbr_0000000b", None, None),
            link(4, "other", Some("tenet:v1:cnci-bridge subnet=x"), None),
            link(5, "tun0", Some("tenet:v1:tunnel key=1"), Some(2)),
            link(6, "tun1", Some("tenet:v1:tunnel key=2"), Some(4)),
            link(7, "foreign", Some("owner=someone-else"), None),
        ];
        assert!(matches!(CN.classify(&links[1]), Owned::Finished(a) if a.kind == "cn-bridge"));
        assert_eq!(CN.classify(&links[2]), Owned::Unfinished);
        assert_eq!(CN.classify(&links[3]), Owned::Foreign);
        let doomed: Vec<&str> = CN
            .reset_selection(&links, |l, a| a.kind == "tunnel" && l.controller == Some(2))
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(doomed, ["tbr_0000000a", "tbr_0000000b", "tun0"]);
    }
}
