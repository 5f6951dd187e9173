//! `tenet-cni`: the CNI plugin. A runtime (podman, containerd, cnitool …) runs it with the
//! `CNI_*` environment and the network configuration on stdin; it prints the result (ADD,
//! VERSION) or a CNI error object on stdout. Logs go to stderr (`RUST_LOG` sets the level,
//! default warn) so stdout stays the runtime's.

use std::io::{Read, Write};
use std::process::ExitCode;

use tenet_cn::cni::{CniError, RuntimeEnv, plugin};

const USAGE: &str = "\
tenet-cni: puts containers on tenet networks (CNI spec 1.0.0; 0.3.0, 0.3.1, 0.4.0).

A container runtime runs it, not a person: CNI_COMMAND=ADD|DEL|CHECK|VERSION,
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS in the environment and the network
configuration on stdin, e.g. /etc/cni/net.d/10-acme.conflist:

  {\"cniVersion\": \"1.0.0\", \"name\": \"acme\",
   \"plugins\": [{\"type\": \"tenet-cni\", \"tenant\": \"acme\", \"mode\": \"gre\",
                \"subnet\": \"172.16.0.0/24\", \"concentrator\": \"<its uuid>\",
                \"socket\": \"/run/tenet/cn.sock\"}]}

Routed mode: \"mode\": \"routed\", \"pool\": \"10.65.0.0/16\" (a Calico pool), no concentrator;
add \"pool6\": \"fd00:65::/48\" (a Calico IPv6 pool) for dual stack.
tenet-cn must run on the host with --api-socket (the socket above). See README.md.";

fn main() -> ExitCode {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h")
    {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    tenet::logging::init_with(tenet::logging::LogFormat::Text, "warn");
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Err(CniError::new(
            tenet_cn::cni::error::code::IO_FAILURE,
            "reading the network configuration from stdin",
            e.to_string(),
        )),
        Ok(_) => RuntimeEnv::from_vars(|k| std::env::var(k).ok())
            .and_then(|env| plugin::run(&env, &stdin)),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(printed) => {
            if let Some(text) = printed {
                let _ = writeln!(out, "{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::warn!(error = %e, "CNI command failed");
            let _ = writeln!(out, "{}", e.to_json(&plugin::error_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}
