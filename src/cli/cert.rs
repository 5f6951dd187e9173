//! `tenet cert`: make the certificates SSNTP nodes authenticate with (ciao-cert's job).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ssntp::Role;
use ssntp::cert::{self, CertRequest};

use super::CliError;

#[derive(Debug, Args)]
#[command(after_help = "\
Example: a CA, the scheduler's certificate and a compute node's.
  tenet cert ca --out pki
  tenet cert issue --ca pki/CAkey-tenet.pem --role scheduler,server --host sched --ip 10.0.0.5 --out pki
  tenet cert issue --ca pki/CAkey-tenet.pem --role agent,netagent --host cn1 --ip 10.0.0.11 --out pki
Give every node pki/CAcert-tenet.pem and its own cert-*.pem; keep CAkey-tenet.pem private.")]
pub struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create a CA: CAcert-NAME.pem (give to every node) and CAkey-NAME.pem (keep private).
    Ca {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Name used in the file names and the CA's common name.
        #[arg(long, default_value = "tenet")]
        name: String,
        #[arg(long, default_value = "tenet")]
        organization: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate with SSNTP roles, signed by a CA from `tenet cert ca`.
    Issue {
        /// The CA's CAkey-NAME.pem (certificate and key).
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        /// Roles, comma separated: server, controller, agent, scheduler, netagent, cnciagent.
        #[arg(long)]
        role: Role,
        /// DNS names for the certificate (repeatable); the first is the common name.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// IP addresses for the certificate (repeatable), e.g. the management address.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value = "tenet")]
        organization: String,
        #[arg(long)]
        email: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// Writes a file with `mode`, refusing to replace one unless asked.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut f = options.open(path).with_context(|| {
        format!(
            "writing {} (use --force to replace an existing file)",
            path.display()
        )
    })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: &CertArgs) -> Result<ExitCode, CliError> {
    match &args.command {
        CertCommand::Ca {
            out,
            name,
            organization,
            days,
            force,
        } => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let ca = cert::generate_ca(name, organization, *days).map_err(anyhow::Error::from)?;
            let cert_path = out.join(cert::ca_cert_file_name(name));
            let key_path = out.join(cert::ca_key_file_name(name));
            // The key first: a half-made CA without its key would be useless.
            write_file(&key_path, &ca.bundle(), 0o600, *force)?;
            write_file(&cert_path, &ca.cert_pem, 0o644, *force)?;
            println!("{}", cert_path.display());
            println!("{}", key_path.display());
        }
        CertCommand::Issue {
            ca,
            role,
            hosts,
            ips,
            organization,
            email,
            days,
            out,
            force,
        } => {
            if hosts.is_empty() && ips.is_empty() {
                return Err(anyhow::anyhow!(
                    "give at least one --host or --ip for the certificate to name"
                )
                .into());
            }
            let pem =
                std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
            let ca_cert = pem_block(&pem, "CERTIFICATE")
                .with_context(|| format!("{}: no CERTIFICATE block", ca.display()))?;
            // tenet writes PKCS#8; ciao-cert writes PKCS#1 RSA keys.
            let ca_key = pem_block(&pem, "PRIVATE KEY")
                .or_else(|| pem_block(&pem, "RSA PRIVATE KEY"))
                .with_context(|| {
                    format!(
                        "{}: no PRIVATE KEY or RSA PRIVATE KEY block (use the CAkey file)",
                        ca.display()
                    )
                })?;
            let mut req = CertRequest::new(*role, hosts.clone(), ips.clone());
            req.organization = organization.clone();
            req.email = email.clone();
            req.validity_days = *days;
            let issued = cert::issue(&ca_cert, &ca_key, &req).map_err(anyhow::Error::from)?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let host = hosts.first().cloned().unwrap_or_else(|| ips[0].to_string());
            let path = out.join(cert::role_cert_file_name(*role, &host));
            write_file(&path, &issued.bundle(), 0o600, *force)?;
            println!("{}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first PEM block with this label, re-armoured.
fn pem_block(pem: &str, label: &str) -> Option<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)?;
    let stop = pem[start..].find(&end)? + start + end.len();
    Some(format!("{}\n", &pem[start..stop]))
}
