//! Docker's libnetwork remote **NetworkDriver** and **IpamDriver**, served by tenet-cn on a
//! unix socket (`--docker-socket /run/docker/plugins/tenet.sock`; dockerd finds sockets in
//! that directory by their name). Plain HTTP/JSON, one POST per call; Docker sends no
//! Content-Type, so bodies are read as bytes and parsed here. Every failure — a malformed
//! body, an unknown network or endpoint — is answered `{"Err": "…"}` (`{"Error": "…"}` for
//! IPAM calls, as libnetwork reads them).
//!
//! * IPAM: the pool is the tenant's subnet (`--subnet`, `--ipam-opt tenant=…`; Docker gives
//!   the IPAM driver its own options only); addresses come from the tenant's IPAM, the
//!   gateway is the subnet's (`.1`, the concentrator's bridge) and is not assigned.
//! * Networks: `-o tenant=… -o concentrator=<uuid> [-o concentrator_ip=…]`, kept in etcd
//!   (`keyspace::docker`), so a restarted agent still knows them.
//! * Endpoints: a container VNIC made as a START makes it (the address is Docker's, so the
//!   agent neither assigns nor releases it), with its Calico endpoint (kind `docker`);
//!   Join hands Docker the container end of the veth to move into the sandbox.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ipnetwork::Ipv4Network;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use ssntp::payload::DeleteFailureReason;
use tenet::calico::vnic::VnicRecord;
use tenet::calico::{CalicoKey, WorkloadEndpoint};
use tenet::keyspace::NetworkMode;
use tenet::keyspace::docker::{self, DockerNetwork};
use tenet::types::gateway_of;
use tokio::net::UnixListener;
use tracing::{Instrument, info, warn};

use super::api::Local;
use super::instance::{CONTAINER_IFNAME, StartRequest};

/// Docker's content type for plugin answers.
const PLUGIN_JSON: &str = "application/vnd.docker.plugins.v1.2+json";

/// What Docker's IPAM asks the gateway address with.
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

/// Network options tenet reads (`docker network create -o KEY=VALUE`).
const NETWORK_OPTIONS: [&str; 3] = ["tenant", "concentrator", "concentrator_ip"];

/// Binds the plugin's socket (replacing a stale one) and serves until the task is dropped.
pub(super) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    super::api::bind(path)
}

pub(super) async fn serve(listener: UnixListener, local: Local) {
    let app = Router::new()
        .route("/{method}", post(call))
        .with_state(local);
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "Docker plugin socket");
    }
}

/// A refusal in libnetwork's shape.
struct Refusal(String);

impl<E: std::fmt::Display> From<E> for Refusal {
    fn from(e: E) -> Self {
        Refusal(e.to_string())
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, PLUGIN_JSON)],
        body.to_string(),
    )
        .into_response()
}

async fn call(
    State(local): State<Local>,
    UrlPath(method): UrlPath<String>,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!("docker", %method);
    let driver = Driver { local: &local };
    match driver.dispatch(&method, &body).instrument(span).await {
        Ok(v) => answer(StatusCode::OK, v),
        Err(Refusal(e)) => {
            warn!(%method, error = %e, "Docker call refused");
            // libnetwork reads a network driver's refusal from "Err", an IPAM driver's from
            // "Error".
            let field = match method.starts_with("IpamDriver.") {
                true => "Error",
                false => "Err",
            };
            answer(StatusCode::OK, json!({ field: e }))
        }
    }
}

fn parse<T: DeserializeOwned>(method: &str, body: &[u8]) -> Result<T, Refusal> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| Refusal(format!("{method}: malformed request: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    options: BTreeMap<String, Value>,
    #[serde(default, rename = "IPv4Data", deserialize_with = "null_as_default")]
    ipv4_data: Vec<IpamData>,
    #[serde(default, rename = "IPv6Data", deserialize_with = "null_as_default")]
    ipv6_data: Vec<IpamData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpamData {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    gateway: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EndpointRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(default)]
    interface: Option<EndpointInterface>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct EndpointInterface {
    #[serde(default)]
    address: String,
    #[serde(default, rename = "AddressIPv6")]
    address_ipv6: String,
    #[serde(default)]
    mac_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RequestPool {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    sub_pool: String,
    #[serde(default, deserialize_with = "null_as_default")]
    options: BTreeMap<String, String>,
    #[serde(default, rename = "V6")]
    v6: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddressRequest {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(default)]
    address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    options: BTreeMap<String, String>,
}

/// The VNIC id of a Docker endpoint: the first 32 characters (128 bits) of its 64-hex id, as
/// VNIC ids have at most 48 bytes. The endpoint's instance is the whole id.
fn vnic_of(endpoint_id: &str) -> String {
    endpoint_id.chars().take(32).collect()
}

/// A pool's id names its tenant and subnet (`acme/172.16.0.0/24`), so no state is needed
/// between RequestPool and the calls that name it.
fn pool_id(tenant: &str, subnet: &Ipv4Network) -> String {
    format!("{tenant}/{subnet}")
}

fn parse_pool_id(id: &str) -> Result<(String, Ipv4Network), Refusal> {
    let (tenant, subnet) = id
        .split_once('/')
        .ok_or_else(|| Refusal(format!("pool {id:?} is not a tenet pool")))?;
    let subnet = subnet
        .parse::<Ipv4Network>()
        .map_err(|_| Refusal(format!("pool {id:?} is not a tenet pool")))?;
    Ok((tenant.to_string(), subnet))
}

/// An address as Docker writes it (`172.16.0.5/24` or `172.16.0.5`).
fn parse_address(text: &str) -> Result<Ipv4Addr, Refusal> {
    let ip = text.split('/').next().unwrap_or_default();
    ip.parse()
        .map_err(|_| Refusal(format!("{text:?} is not an IPv4 address")))
}

/// Go sends a nil map or slice as `null`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

struct Driver<'a> {
    local: &'a Local,
}

impl Driver<'_> {
    async fn dispatch(&self, method: &str, body: &[u8]) -> Result<Value, Refusal> {
        match method {
            "Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
            "NetworkDriver.GetCapabilities" => {
                Ok(json!({"Scope": "local", "ConnectivityScope": "local"}))
            }
            "NetworkDriver.CreateNetwork" => self.create_network(parse(method, body)?).await,
            "NetworkDriver.DeleteNetwork" => self.delete_network(parse(method, body)?).await,
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(parse(method, body)?).await,
            "NetworkDriver.DeleteEndpoint" => self.delete_endpoint(parse(method, body)?).await,
            "NetworkDriver.EndpointOperInfo" => {
                let e: EndpointRef = parse(method, body)?;
                let (_, record) = self.endpoint(&e).await?;
                Ok(json!({"Value": {"tenet.ifname": record.ifname, "tenet.tenant": record.tenant}}))
            }
            "NetworkDriver.Join" => self.join(parse(method, body)?).await,
            "NetworkDriver.Leave" => {
                let e: EndpointRef = parse(method, body)?;
                self.endpoint(&e).await?;
                Ok(json!({}))
            }
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity" => {
                // The concentrator is the way out; there is nothing to program on the host.
                let e: EndpointRef = parse(method, body)?;
                self.network(&e.network_id).await?;
                Ok(json!({}))
            }
            "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => Ok(json!({})),
            "IpamDriver.GetCapabilities" => {
                Ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
            }
            "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": "tenet",
                "GlobalDefaultAddressSpace": "tenet-global",
            })),
            "IpamDriver.RequestPool" => self.request_pool(parse(method, body)?),
            "IpamDriver.ReleasePool" => {
                #[derive(Deserialize)]
                struct ReleasePool {
                    #[serde(rename = "PoolID")]
                    pool_id: String,
                }
                let r: ReleasePool = parse(method, body)?;
                parse_pool_id(&r.pool_id)?;
                Ok(json!({}))
            }
            "IpamDriver.RequestAddress" => self.request_address(parse(method, body)?).await,
            "IpamDriver.ReleaseAddress" => self.release_address(parse(method, body)?).await,
            other => Err(Refusal(format!(
                "{other} is not a call tenet's plugin knows"
            ))),
        }
    }

    fn refuse_routed(&self) -> Result<(), Refusal> {
        match self.local.mode() {
            NetworkMode::Routed => Err(Refusal(
                "this node runs in routed mode; tenet's Docker networks are gre networks (use the CNI plugin for routed containers)".into(),
            )),
            _ => Ok(()),
        }
    }

    fn request_pool(&self, r: RequestPool) -> Result<Value, Refusal> {
        self.refuse_routed()?;
        if r.v6 {
            return Err(Refusal("tenet's Docker networks are IPv4 only".into()));
        }
        let tenant = r.options.get("tenant").map(String::as_str).unwrap_or("");
        if tenant.is_empty() || tenant.contains('/') {
            return Err(Refusal(
                "tenet's IPAM is per tenant: add --ipam-opt tenant=<tenant> (Docker gives the IPAM driver only its own options)".into(),
            ));
        }
        if r.pool.is_empty() {
            return Err(Refusal(
                "give the tenant subnet: docker network create --subnet …".into(),
            ));
        }
        if !r.sub_pool.is_empty() {
            return Err(Refusal(
                "--ip-range is not supported: the whole subnet is the pool".into(),
            ));
        }
        let subnet: Ipv4Network = r
            .pool
            .parse()
            .map_err(|e| Refusal(format!("subnet {:?}: {e}", r.pool)))?;
        if subnet.ip() != subnet.network() {
            return Err(Refusal(format!("subnet {subnet} is not a network address")));
        }
        if subnet.prefix() > 26 {
            return Err(Refusal(format!(
                "subnet {subnet} is smaller than a /26, tenet's smallest tenant subnet"
            )));
        }
        info!(%tenant, %subnet, "pool");
        Ok(json!({"PoolID": pool_id(tenant, &subnet), "Pool": subnet.to_string(), "Data": {}}))
    }

    async fn request_address(&self, r: AddressRequest) -> Result<Value, Refusal> {
        let (tenant, subnet) = parse_pool_id(&r.pool_id)?;
        let gateway = gateway_of(&subnet);
        let wanted = match r.address.as_str() {
            "" => None,
            a => Some(parse_address(a)?),
        };
        if r.options.get("RequestAddressType").map(String::as_str) == Some(GATEWAY_REQUEST) {
            if wanted.is_some_and(|w| w != gateway) {
                return Err(Refusal(format!(
                    "the gateway of {subnet} is {gateway} (the concentrator's bridge); drop --gateway"
                )));
            }
            return Ok(json!({"Address": format!("{gateway}/{}", subnet.prefix()), "Data": {}}));
        }
        let handle = format!("docker.{}", ssntp::Uuid::new_v4());
        let attributes = [("docker".to_string(), "true".to_string())].into();
        let ip = self
            .local
            .agent
            .ipam(&tenant)
            .assign_in_subnet(subnet, &self.local.agent.host, &handle, wanted, attributes)
            .await?;
        info!(%tenant, %ip, %handle, "address");
        Ok(json!({"Address": format!("{ip}/{}", subnet.prefix()), "Data": {}}))
    }

    async fn release_address(&self, r: AddressRequest) -> Result<Value, Refusal> {
        let (tenant, subnet) = parse_pool_id(&r.pool_id)?;
        let ip = parse_address(&r.address)?;
        if ip != gateway_of(&subnet) {
            self.local
                .agent
                .ipam(&tenant)
                .release_ips(&[ip.into()])
                .await?;
            info!(%tenant, %ip, "address released");
        }
        Ok(json!({}))
    }

    async fn network(&self, id: &str) -> Result<DockerNetwork, Refusal> {
        let key = docker::network_key(id);
        let raw = self
            .local
            .agent
            .store
            .get(&key)
            .await?
            .ok_or_else(|| Refusal(format!("no tenet network {id}")))?;
        Ok(docker::decode(&key, &raw.value)?)
    }

    async fn create_network(&self, r: CreateNetwork) -> Result<Value, Refusal> {
        self.refuse_routed()?;
        if !r.ipv6_data.is_empty() {
            return Err(Refusal("tenet's Docker networks are IPv4 only".into()));
        }
        let [data] = r.ipv4_data.as_slice() else {
            return Err(Refusal(format!(
                "a tenet network has one IPv4 subnet, not {}",
                r.ipv4_data.len()
            )));
        };
        let generic = match r.options.get("com.docker.network.generic") {
            Some(Value::Object(o)) => o.clone(),
            _ => Default::default(),
        };
        for key in generic.keys() {
            if !NETWORK_OPTIONS.contains(&key.as_str()) {
                return Err(Refusal(format!(
                    "unknown option {key}; tenet takes -o {}",
                    NETWORK_OPTIONS.join(", -o ")
                )));
            }
        }
        let option = |k: &str| {
            generic
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let tenant = option("tenant");
        let concentrator = option("concentrator");
        if tenant.is_empty() {
            return Err(Refusal("name the tenant: -o tenant=<tenant>".into()));
        }
        if concentrator.is_empty() {
            return Err(Refusal(
                "name the tenant's concentrator: -o concentrator=<its UUID>".into(),
            ));
        }
        let concentrator_ip = match option("concentrator_ip").as_str() {
            "" => None,
            ip => Some(parse_address(ip)?),
        };
        let subnet: Ipv4Network = data
            .pool
            .parse()
            .map_err(|e| Refusal(format!("subnet {:?}: {e}", data.pool)))?;
        let gateway = gateway_of(&subnet);
        if !data.gateway.is_empty() && parse_address(&data.gateway)? != gateway {
            return Err(Refusal(format!(
                "the gateway of {subnet} is {gateway} (the concentrator's bridge)"
            )));
        }
        // The concentrator must exist and serve the tenant (unless its address is given).
        if concentrator_ip.is_none() {
            self.local
                .agent
                .concentrator_ip(&tenant, &concentrator)
                .await
                .map_err(|r| Refusal(r.detail))?;
        }
        let network = DockerNetwork {
            id: r.network_id.clone(),
            tenant,
            subnet,
            gateway,
            concentrator,
            concentrator_ip,
        };
        let value = serde_json::to_vec(&network).expect("networks serialise");
        self.local
            .agent
            .store
            .put(&docker::network_key(&r.network_id), &value)
            .await?;
        info!(network = %r.network_id, tenant = %network.tenant, %subnet, "network created");
        Ok(json!({}))
    }

    async fn delete_network(&self, r: NetworkRef) -> Result<Value, Refusal> {
        self.network(&r.network_id).await?;
        self.local
            .agent
            .store
            .delete(&docker::network_key(&r.network_id), None)
            .await?;
        info!(network = %r.network_id, "network deleted");
        Ok(json!({}))
    }

    /// The endpoint's record, on a known network.
    async fn endpoint(&self, e: &EndpointRef) -> Result<(DockerNetwork, VnicRecord), Refusal> {
        let network = self.network(&e.network_id).await?;
        let key = CalicoKey::WorkloadEndpoint(
            self.local
                .agent
                .endpoint_id(&e.endpoint_id, &vnic_of(&e.endpoint_id)),
        )
        .path();
        let raw = self
            .local
            .agent
            .store
            .get(&key)
            .await?
            .ok_or_else(|| Refusal(format!("no endpoint {} on this host", e.endpoint_id)))?;
        let endpoint: WorkloadEndpoint = serde_json::from_slice(&raw.value)?;
        let record = VnicRecord::from_endpoint(&endpoint)?;
        Ok((network, record))
    }

    async fn create_endpoint(&self, r: CreateEndpoint) -> Result<Value, Refusal> {
        let network = self.network(&r.network_id).await?;
        let iface = r.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(Refusal("tenet's Docker networks are IPv4 only".into()));
        }
        if iface.address.is_empty() {
            return Err(Refusal(
                "the endpoint has no address: create the network with --ipam-driver tenet".into(),
            ));
        }
        let ip = parse_address(&iface.address)?;
        let mac = match iface.mac_address.as_str() {
            "" => None,
            m => Some(
                m.parse()
                    .map_err(|_| Refusal(format!("MAC address {m:?} is malformed")))?,
            ),
        };
        let concentrator_ip = match network.concentrator_ip {
            Some(ip) => ip,
            None => self
                .local
                .agent
                .concentrator_ip(&network.tenant, &network.concentrator)
                .await
                .map_err(|r| Refusal(r.detail))?,
        };
        let start = StartRequest {
            instance: r.endpoint_id.clone(),
            vnic: vnic_of(&r.endpoint_id),
            tenant: network.tenant.clone(),
            subnet: network.subnet,
            concentrator: network.concentrator.clone(),
            concentrator_ip,
            mac,
            ip: Some(ip),
            container: true,
            netns: None,
            ifname: CONTAINER_IFNAME.into(),
            pool6: None,
            docker: true,
            queues: 1,
        };
        let started = self
            .local
            .start(&start)
            .await
            .map_err(|r| Refusal(r.detail))?;
        info!(endpoint = %r.endpoint_id, %ip, ifname = %started.vnic.ifname, "endpoint created");
        // Docker takes the MAC from the driver only when it did not choose one.
        Ok(match mac {
            Some(_) => json!({}),
            None => json!({"Interface": {"MacAddress": started.mac.to_string()}}),
        })
    }

    async fn delete_endpoint(&self, r: EndpointRef) -> Result<Value, Refusal> {
        self.network(&r.network_id).await?;
        match self
            .local
            .delete(&r.endpoint_id, Some(&vnic_of(&r.endpoint_id)))
            .await
        {
            Ok(()) => {
                info!(endpoint = %r.endpoint_id, "endpoint deleted");
                Ok(json!({}))
            }
            Err(e) if e.reason == DeleteFailureReason::NoInstance => Err(Refusal(format!(
                "no endpoint {} on this host",
                r.endpoint_id
            ))),
            Err(e) => Err(Refusal(e.detail)),
        }
    }

    async fn join(&self, r: EndpointRef) -> Result<Value, Refusal> {
        let (network, record) = self.endpoint(&r).await?;
        Ok(json!({
            "InterfaceName": {"SrcName": crate::names::peer_of(&record.ifname), "DstPrefix": "eth"},
            "Gateway": network.gateway.to_string(),
        }))
    }
}
