//! The iptables backends: `iptables-nft` (Debian's default) and `iptables-legacy`, driven by
//! their `-restore` and `-save` programs inside the firewall's namespace.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{FirewallBackend, FirewallError, rejected};
use crate::process::Command;

/// Which iptables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesVariant {
    Nft,
    Legacy,
}

impl IptablesVariant {
    /// The variant the system's `iptables` is (Debian's alternatives).
    pub async fn detect() -> Result<Self, FirewallError> {
        let out = Command::new("iptables").arg("--version").run().await?;
        Ok(if out.stdout.contains("legacy") {
            IptablesVariant::Legacy
        } else {
            IptablesVariant::Nft
        })
    }

    pub fn restore_program(self) -> &'static str {
        match self {
            IptablesVariant::Nft => "iptables-nft-restore",
            IptablesVariant::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save_program(self) -> &'static str {
        match self {
            IptablesVariant::Nft => "iptables-nft-save",
            IptablesVariant::Legacy => "iptables-legacy-save",
        }
    }
}

/// Which address family's tables: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

pub struct Iptables {
    variant: IptablesVariant,
    family: IpFamily,
    netns: Option<PathBuf>,
}

impl Iptables {
    pub fn new(variant: IptablesVariant, netns: Option<&Path>) -> Self {
        Self::for_family(variant, IpFamily::V4, netns)
    }

    /// The IPv6 tables (`ip6tables-…-restore`) when `family` is [`IpFamily::V6`].
    pub fn for_family(variant: IptablesVariant, family: IpFamily, netns: Option<&Path>) -> Self {
        Iptables {
            variant,
            family,
            netns: netns.map(Path::to_path_buf),
        }
    }

    fn restore_program(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => self.variant.restore_program(),
            IpFamily::V6 => match self.variant {
                IptablesVariant::Nft => "ip6tables-nft-restore",
                IptablesVariant::Legacy => "ip6tables-legacy-restore",
            },
        }
    }

    fn save_program(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => self.variant.save_program(),
            IpFamily::V6 => match self.variant {
                IptablesVariant::Nft => "ip6tables-nft-save",
                IptablesVariant::Legacy => "ip6tables-legacy-save",
            },
        }
    }

    async fn run_restore(&self, batch: &str) -> Result<(), FirewallError> {
        let program = self.restore_program();
        Command::new(program)
            .arg("--noflush")
            .netns(self.netns.as_deref())
            .stdin(batch)
            .run()
            .await
            .map_err(|e| rejected(program, batch, e))?;
        Ok(())
    }
}

#[async_trait]
impl FirewallBackend for Iptables {
    fn name(&self) -> &'static str {
        match (self.family, self.variant) {
            (IpFamily::V4, IptablesVariant::Nft) => "iptables-nft",
            (IpFamily::V4, IptablesVariant::Legacy) => "iptables-legacy",
            (IpFamily::V6, IptablesVariant::Nft) => "ip6tables-nft",
            (IpFamily::V6, IptablesVariant::Legacy) => "ip6tables-legacy",
        }
    }

    async fn save(&self) -> Result<String, FirewallError> {
        Ok(Command::new(self.save_program())
            .netns(self.netns.as_deref())
            .run()
            .await?
            .stdout)
    }

    async fn restore(&self, batch: &str) -> Result<(), FirewallError> {
        // One exec: iptables-restore commits table by table, so a batch refused in its
        // second table leaves the first applied, and a dry run (`--test`) would not help
        // with iptables-nft, whose dry run skips the kernel's checks. `Firewall` undoes a
        // refused batch from what it saved before instead.
        self.run_restore(batch).await
    }
}
