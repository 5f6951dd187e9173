use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tenet::dump::{Decoded, dump};

use super::{Cli, CliError, connect, store_error};

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Key prefix to list (e.g. /calico/ipam, /tenet).
    #[arg(default_value = "/calico")]
    prefix: String,

    /// Output format: a table of keys and kinds, or JSON with the decoded values.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

pub async fn run(cli: &Cli, args: &DumpArgs) -> Result<ExitCode, CliError> {
    let (store, config) = connect(cli).await?;
    let entries = dump(&store, &args.prefix)
        .await
        .map_err(|e| store_error(&config, e))?;
    let invalid = entries.iter().filter(|e| !e.is_valid()).count();
    match args.output {
        Output::Json => {
            let text = serde_json::to_string_pretty(&entries).context("cannot print JSON")?;
            println!("{text}");
        }
        Output::Table => {
            let width = entries
                .iter()
                .map(|e| e.key.len())
                .max()
                .unwrap_or(3)
                .max(3);
            println!("{:<width$}  KIND", "KEY");
            for e in &entries {
                match &e.decoded {
                    Decoded::Value(_) => println!("{:<width$}  {}", e.key, e.kind),
                    Decoded::Error(reason) => {
                        println!("{:<width$}  {} INVALID: {reason}", e.key, e.kind)
                    }
                }
            }
        }
    }
    if invalid > 0 {
        eprintln!(
            "tenet: {invalid} of {} keys under {} do not decode",
            entries.len(),
            args.prefix
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
