//! A concentrator VM's VNIC: a macvtap on the compute link. Not a tenant VNIC: no bridge, no
//! tunnel, no event; found again by its alias.

use tenet::net::alias::Alias;
use tenet::net::owned;
use tenet::net::{Leftovers, Link, MacvtapMode, NewLink};
use tenet::types::MacAddr;
use tracing::info;

use super::ComputeNode;
use crate::config::{VnicConfig, VnicRole};
use crate::error::CnError;
use crate::names::{self, CNCI_VNIC_KIND, OWNERSHIP};

impl ComputeNode {
    /// A concentrator VM's VNIC: a macvtap (bridge mode) on the compute link with the given
    /// MAC. Idempotent; returns the link (its `/dev/tapN` is `Link::macvtap_device`).
    pub async fn create_cnci_vnic(&self, config: &VnicConfig) -> Result<Link, CnError> {
        let checked = config.check(&[VnicRole::Concentrator])?;
        let _permit = self.admit(None).await?;
        let _shared = self.rebuild_lock.read().await;
        let alias = cnci_alias(config);
        if let Some(link) = self.netlink.link_by_alias(&alias.to_string()).await? {
            return Ok(link);
        }
        let name = OWNERSHIP
            .fresh_name(&self.netlink, names::CNCI_VNIC)
            .await?;
        let mut new = NewLink::macvtap(&name, self.underlay.compute.index, MacvtapMode::Bridge);
        if let Some(mac) = checked.mac {
            new = new.mac(MacAddr::octets(mac));
        }
        let index = self.netlink.create_index(&new.up()).await?;
        if let Err(e) = owned::commit(&self.netlink, index, &alias).await {
            let mut left = Leftovers::new();
            left.note(self.netlink.delete(index).await);
            left.log(&format!("concentrator VNIC {name}"));
            return Err(CnError::from(e).with_leftovers(left));
        }
        info!(ifname = %name, vnic = %config.vnic_id, "concentrator VNIC created");
        self.netlink
            .link_by_index(index)
            .await?
            .ok_or_else(|| CnError::Dependency {
                what: format!("concentrator VNIC {}", config.vnic_id),
                why: format!("{name} has disappeared from the kernel"),
            })
    }

    /// Removes a concentrator VNIC; an unknown one is not an error.
    pub async fn destroy_cnci_vnic(&self, config: &VnicConfig) -> Result<(), CnError> {
        config.check(&[VnicRole::Concentrator])?;
        let _shared = self.rebuild_lock.read().await;
        let alias = cnci_alias(config).to_string();
        if let Some(link) = self.netlink.link_by_alias(&alias).await? {
            self.netlink.delete(link.index).await?;
        }
        Ok(())
    }
}

fn cnci_alias(config: &VnicConfig) -> Alias {
    Alias::new(CNCI_VNIC_KIND)
        .with("tenant", &config.tenant_id)
        .with("id", &config.vnic_id)
}
