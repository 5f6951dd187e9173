//! Destroying tenant VNICs, one or many at once: the bookkeeping first (under the lock), then
//! every VNIC link in one link-group deletion and every emptied subnet in another.

use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::topology::{Removal, ready_index, wait_ready};
use super::{ComputeNode, ContainerEvent, DestroyedVnic, TunnelEventKind};
use crate::config::{VnicConfig, VnicRole};
use crate::error::CnError;

impl ComputeNode {
    /// Destroys a tenant VNIC; an unknown VNIC is not an error. The last VNIC of a subnet also
    /// removes its tunnel and bridge and returns TunnelDel.
    pub async fn destroy_vnic(
        &self,
        config: &VnicConfig,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<DestroyedVnic, CnError> {
        let mut out = self
            .destroy_vnics(std::slice::from_ref(config), cancel)
            .await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Destroys many VNICs at once, as [`ComputeNode::destroy_vnic`] does each one, but with
    /// the kernel work batched: every VNIC in one link-group deletion, then every subnet they
    /// emptied in another. Returns one result per config, in order. Every config is checked
    /// first; a bad one fails the call before anything is touched. The VNICs are forgotten
    /// before the kernel work, so if the kernel refuses a deletion the error is returned and
    /// the links left over are taken up by the next [`ComputeNode::rebuild`].
    pub async fn destroy_vnics(
        &self,
        configs: &[VnicConfig],
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<Vec<DestroyedVnic>, CnError> {
        for config in configs {
            config.check(&[VnicRole::Vm, VnicRole::Container])?;
        }
        let _permit = self.admit(cancel).await?;
        let _shared = self.rebuild_lock.read().await;
        let span = info_span!("destroy_vnics", count = configs.len());
        let ids: Vec<&str> = configs.iter().map(|c| c.vnic_id.as_str()).collect();
        self.destroy_ids(&ids).instrument(span).await
    }

    /// Destroys VNICs known only by their ids, as [`ComputeNode::destroy_vnics`] does: for
    /// VNICs found after a restart that no request describes any more (a START cut short
    /// by a crash). Unknown ids are not an error.
    pub async fn destroy_vnics_by_id(&self, ids: &[&str]) -> Result<Vec<DestroyedVnic>, CnError> {
        let _permit = self.admit(None).await?;
        let _shared = self.rebuild_lock.read().await;
        let span = info_span!("destroy_vnics_by_id", count = ids.len());
        self.destroy_ids(ids).instrument(span).await
    }

    async fn destroy_ids(&self, vnic_ids: &[&str]) -> Result<Vec<DestroyedVnic>, CnError> {
        let ids = || vnic_ids.iter().copied();
        // Creates still in flight finish (or fail and clean up) first; one that fails is
        // simply not there to destroy.
        let in_flight = self.topology().in_flight(ids());
        for rx in in_flight {
            if let Err(e) = wait_ready(rx, "VNIC", self.config.wait_timeout).await {
                info!(error = %e, "a create being destroyed did not finish");
            }
        }

        // Before the lock goes, an emptied subnet's tunnel leaves the datapath: a create for
        // the same subnet may start a new tunnel with the same key and peer right after.
        let removals: Vec<Option<Removal>> = self
            .topology()
            .take_removals(ids(), |s| self.tunnels.forget(&s.links.tunnel));

        let vnic_links: Vec<u32> = removals
            .iter()
            .flatten()
            .filter_map(|r| ready_index(&r.vnic.progress))
            .collect();
        self.netlink.delete_many(&vnic_links).await?;
        fault_point!(self, VnicsDeleted);
        let mut subnet_links = Vec::new();
        for s in removals.iter().flatten().filter_map(|r| r.subnet.as_ref()) {
            subnet_links.extend(ready_index(&s.progress));
            if s.links.tunnel.is_empty() {
                // A subnet `rebuild` could not give a tunnel.
                continue;
            }
            match self.netlink.link_by_name(&s.links.tunnel).await {
                Ok(Some(t)) => subnet_links.push(t.index),
                Ok(None) => {}
                Err(e) => warn!(tunnel = %s.links.tunnel, error = %e, "looking up tunnel"),
            }
        }
        self.netlink.delete_many(&subnet_links).await?;

        let out: Vec<DestroyedVnic> = removals
            .into_iter()
            .map(|r| match r {
                Some(Removal {
                    vnic,
                    subnet: Some(subnet),
                }) => DestroyedVnic {
                    tunnel: Some(self.event(TunnelEventKind::Del, &vnic.subnet)),
                    container: subnet.had_container.then(|| ContainerEvent::Del {
                        bridge: subnet.links.bridge.clone(),
                    }),
                },
                _ => DestroyedVnic::default(),
            })
            .collect();
        info!(
            vnics = vnic_links.len(),
            tunnel_del = out.iter().filter(|d| d.tunnel.is_some()).count(),
            "VNICs destroyed"
        );
        Ok(out)
    }
}
