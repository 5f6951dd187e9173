use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use ipnetwork::IpNetwork;
use tenet::ipam::{AutoAssignArgs, Ipam, IpamError, IpamScope};
use tenet::store::config::DatastoreConfig;

use super::{Cli, CliError, connect, store_error};

#[derive(Debug, Args)]
pub struct IpamArgs {
    /// Work on this tenant's own IPAM (the overlays' per-tenant subnets, under
    /// /tenet/v1/tenant/<tenant>/ipam/) instead of Calico's. `check` without it checks
    /// Calico's and every tenant's.
    #[arg(long, global = true, value_name = "TENANT")]
    tenant: Option<String>,
    #[command(subcommand)]
    command: IpamCommand,
}

#[derive(Debug, Subcommand)]
enum IpamCommand {
    /// Assign addresses to a host (one per line on stdout).
    ///
    /// Without --ip, addresses come from the host's affine blocks, then new blocks, then
    /// (unless strict affinity is on) other hosts' blocks. Exit status 1 if fewer than --num
    /// could be assigned (the ones that were are still printed and stay assigned).
    Assign {
        /// The host the addresses are for.
        #[arg(long)]
        host: String,
        /// Record the addresses under this handle (e.g. a container or VNIC id).
        #[arg(long)]
        handle: Option<String>,
        /// Assign exactly this address.
        #[arg(long, conflicts_with_all = ["num", "pool", "ipv6"])]
        ip: Option<String>,
        /// Only from this pool (repeatable).
        #[arg(long)]
        pool: Vec<String>,
        /// How many addresses.
        #[arg(long, default_value_t = 1)]
        num: usize,
        /// IPv6 addresses instead of IPv4.
        #[arg(long)]
        ipv6: bool,
    },
    /// Release an address, or every address of a handle.
    Release {
        #[arg(long, required_unless_present = "handle", conflicts_with = "handle")]
        ip: Option<String>,
        #[arg(long)]
        handle: Option<String>,
    },
    /// Show what an address is assigned to (calicoctl's wording).
    Show {
        #[arg(long)]
        ip: String,
    },
    /// Find leaked addresses, handles out of step with blocks, and affinity keys and blocks
    /// that disagree. Exit status 1 if anything is found (after --repair: if anything remains).
    Check {
        /// Release leaked addresses, rewrite handles from the blocks, fix affinity keys.
        #[arg(long)]
        repair: bool,
    },
    /// Manage IP pools.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a pool (it must hold at least one /26 or /122 block).
    Add {
        cidr: String,
        /// Masquerade traffic from the pool leaving it.
        #[arg(long)]
        nat_outgoing: bool,
    },
    /// Disable a pool, release all affinities to its blocks and delete it.
    Delete { cidr: String },
    /// List pools.
    List,
}

fn parse_ip(text: &str) -> Result<IpAddr, CliError> {
    text.parse()
        .map_err(|_| CliError::Other(anyhow!("invalid IP address specified: {text}")))
}

fn parse_cidr(text: &str) -> Result<IpNetwork, CliError> {
    let cidr: IpNetwork = text
        .parse()
        .map_err(|e| CliError::Other(anyhow!("invalid CIDR specified: {text}: {e}")))?;
    tenet::calico::canonical(cidr)
        .map_err(|e| CliError::Other(anyhow!("invalid CIDR specified: {e}")))
}

fn ipam_error(config: &DatastoreConfig, err: IpamError) -> CliError {
    match err {
        IpamError::Store(e) => store_error(config, e),
        other => CliError::Other(other.into()),
    }
}

pub async fn run(cli: &Cli, args: &IpamArgs) -> Result<ExitCode, CliError> {
    // Validate the command line before touching the datastore.
    match &args.command {
        IpamCommand::Assign { ip, pool, .. } => {
            ip.as_deref().map(parse_ip).transpose()?;
            pool.iter()
                .map(|p| parse_cidr(p))
                .collect::<Result<Vec<_>, _>>()?;
        }
        IpamCommand::Release { ip: Some(ip), .. } | IpamCommand::Show { ip } => {
            parse_ip(ip)?;
        }
        IpamCommand::Pool {
            command: PoolCommand::Add { cidr, .. } | PoolCommand::Delete { cidr },
        } => {
            parse_cidr(cidr)?;
        }
        _ => {}
    }
    let (store, config) = connect(cli).await?;
    let store: Arc<dyn tenet::store::Datastore> = Arc::new(store);
    let ipam = match &args.tenant {
        Some(t) => Ipam::for_tenant(store.clone(), t),
        None => Ipam::new(store.clone()),
    };
    let err = |e| ipam_error(&config, e);
    match &args.command {
        IpamCommand::Assign {
            host,
            handle,
            ip: Some(ip),
            ..
        } => {
            let ip = parse_ip(ip)?;
            ipam.assign_ip(ip, handle.as_deref(), BTreeMap::new(), host)
                .await
                .map_err(err)?;
            println!("{ip}");
        }
        IpamCommand::Assign {
            host,
            handle,
            ip: None,
            pool,
            num,
            ipv6,
        } => {
            let pools: Vec<IpNetwork> = pool
                .iter()
                .map(|p| parse_cidr(p))
                .collect::<Result<_, _>>()?;
            let pools = (!pools.is_empty()).then_some(pools);
            let request = AutoAssignArgs {
                num_v4: if *ipv6 { 0 } else { *num },
                num_v6: if *ipv6 { *num } else { 0 },
                handle: handle.clone(),
                host: host.clone(),
                pools_v4: if *ipv6 { None } else { pools.clone() },
                pools_v6: if *ipv6 { pools } else { None },
                ..Default::default()
            };
            let (v4, v6) = ipam.auto_assign(&request).await.map_err(err)?;
            let got: Vec<IpAddr> = v4.into_iter().chain(v6).collect();
            for ip in &got {
                println!("{ip}");
            }
            if got.len() < *num {
                eprintln!(
                    "tenet: assigned only {} of {num} addresses (the pools are exhausted)",
                    got.len()
                );
                return Ok(ExitCode::from(1));
            }
        }
        IpamCommand::Release { ip: Some(ip), .. } => {
            let ip = parse_ip(ip)?;
            let not = ipam.release_ips(&[ip]).await.map_err(err)?;
            if !not.is_empty() {
                eprintln!("IP address {ip} is not assigned");
                return Ok(ExitCode::from(1));
            }
            println!("Successfully released IP address {ip}");
        }
        IpamCommand::Release {
            handle: Some(handle),
            ..
        } => {
            let n = ipam.release_by_handle(handle).await.map_err(err)?;
            println!("Successfully released {n} IP address(es) of handle {handle}");
        }
        IpamCommand::Release { .. } => unreachable!("clap requires --ip or --handle"),
        IpamCommand::Show { ip } => {
            let ip = parse_ip(ip)?;
            match ipam.get_assignment_attributes(ip).await {
                Ok((_, attrs)) if attrs.is_empty() => println!("No attributes defined for IP {ip}"),
                Ok((_, attrs)) => {
                    let pairs: Vec<String> =
                        attrs.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    println!("map[{}]", pairs.join(" "));
                }
                Err(e @ (IpamError::NotAssigned(_) | IpamError::NotAssignedInBlock(_))) => {
                    println!("{e}")
                }
                Err(e) => return Err(err(e)),
            }
        }
        IpamCommand::Check { repair } => {
            let mut scopes = vec![ipam];
            if args.tenant.is_none() {
                for t in tenet::ipam::tenants_with_ipam(store.as_ref())
                    .await
                    .map_err(|e| store_error(&config, e))?
                {
                    scopes.push(Ipam::for_tenant(store.clone(), &t));
                }
            }
            let mut problems = 0;
            for ipam in &scopes {
                let report = if *repair {
                    ipam.repair().await
                } else {
                    ipam.check().await
                }
                .map_err(err)?;
                let whose = match ipam.scope() {
                    IpamScope::Calico => "calico".to_string(),
                    IpamScope::Tenant(t) => format!("tenant {t}"),
                };
                println!(
                    "{whose}: {} blocks, {} handles, {} allocated addresses",
                    report.blocks, report.handles, report.allocated
                );
                for finding in &report.findings {
                    println!("{whose}: {finding}");
                }
                problems += report.findings.len();
            }
            if problems > 0 {
                let what = if *repair {
                    "remain after repair"
                } else {
                    "found (run with --repair to fix)"
                };
                eprintln!("tenet: {problems} problem(s) {what}");
                return Ok(ExitCode::from(1));
            }
            println!("IPAM is consistent");
        }
        IpamCommand::Pool { command } => match command {
            PoolCommand::Add { cidr, nat_outgoing } => {
                let cidr = parse_cidr(cidr)?;
                ipam.create_pool(cidr, *nat_outgoing).await.map_err(err)?;
                println!("Successfully created pool {cidr}");
            }
            PoolCommand::Delete { cidr } => {
                let cidr = parse_cidr(cidr)?;
                ipam.delete_pool(cidr).await.map_err(err)?;
                println!("Successfully deleted pool {cidr}");
            }
            PoolCommand::List => {
                println!("{:<40} {:<6} DISABLED", "CIDR", "NAT");
                for v4 in [true, false] {
                    for p in ipam.pools(v4).await.map_err(err)? {
                        println!(
                            "{:<40} {:<6} {}",
                            p.cidr.to_string(),
                            p.masquerade,
                            p.disabled
                        );
                    }
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
