//! calicoctl's resource commands: `create|replace|apply|delete -f FILE` and
//! `get|delete KIND [NAME]`, with calicoctl's kind aliases, messages, exit statuses and output
//! formats (reference: calico-data-model.md §4.4–4.6), so scripts written for calicoctl keep
//! working. Every resource in a file is parsed and validated before anything is written;
//! then they are processed in file order, stopping at the first error.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde_json::Value;
use tenet::calico::resource::{
    Identifiers, Resource, ResourceClient, ResourceError, ResourceId, ResourceKind,
};
use tenet::store::Datastore;

use super::{Cli, CliError, connect};

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// A YAML or JSON file of resources (several documents, lists and `<kind>List`s
    /// allowed); `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    filename: PathBuf,
    /// create only: a resource that already exists is not an error.
    #[arg(long)]
    skip_exists: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The kind (calicoctl's aliases: ippool/ipp/pool, policy/pol, profile/pro, …) when not
    /// deleting from a file.
    #[arg(value_name = "KIND", required_unless_present = "filename")]
    kind: Option<String>,
    /// The resource's name (an ipPool's is its CIDR).
    #[arg(value_name = "NAME", requires = "kind")]
    name: Option<String>,
    /// Delete the resources a file describes.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "kind"
    )]
    filename: Option<PathBuf>,
    /// A resource that does not exist is not an error.
    #[arg(short = 's', long)]
    skip_not_exists: bool,
    #[command(flatten)]
    ids: IdentifierArgs,
}

/// calicoctl's identifier flags.
#[derive(Debug, Args)]
pub struct IdentifierArgs {
    /// The node (workloadEndpoint, hostEndpoint, bgpPeer).
    #[arg(short = 'n', long)]
    node: Option<String>,
    /// The orchestrator (workloadEndpoint).
    #[arg(long)]
    orchestrator: Option<String>,
    /// The workload (workloadEndpoint).
    #[arg(long)]
    workload: Option<String>,
    /// bgpPeer: global or node.
    #[arg(long)]
    scope: Option<String>,
}

impl IdentifierArgs {
    fn to_identifiers(&self) -> Identifiers {
        Identifiers {
            node: self.node.clone(),
            orchestrator: self.orchestrator.clone(),
            workload: self.workload.clone(),
            scope: self.scope.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The kind (calicoctl's aliases: ippool/ipp/pool, policy/pol, profile/pro, …).
    #[arg(value_name = "KIND")]
    kind: String,
    /// Only this one (an ipPool's name is its CIDR); none printed if it does not exist.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// ps (default), wide, custom-columns=COL1,COL2, yaml, json, go-template=TEMPLATE or
    /// go-template-file=PATH (a subset: field paths like .Metadata.Name, range, if/else and
    /// string literals).
    #[arg(short, long, default_value = "ps")]
    output: String,
    #[command(flatten)]
    ids: IdentifierArgs,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Create,
    Replace,
    Apply,
    Delete,
}

impl Verb {
    fn word(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Replace => "replace",
            Verb::Apply => "apply",
            Verb::Delete => "delete",
        }
    }
    fn past(self) -> &'static str {
        match self {
            Verb::Create => "created",
            Verb::Replace => "replaced",
            Verb::Apply => "applied",
            Verb::Delete => "deleted",
        }
    }
}

fn fail(message: impl std::fmt::Display) -> Result<ExitCode, CliError> {
    eprintln!("{message}");
    Ok(ExitCode::from(1))
}

/// The resources in `text`: every YAML/JSON document, each a resource, a list of them or a
/// `<kind>List` with `items`; every one parsed and validated.
pub fn parse_resources(text: &str, verb: Verb) -> Result<Vec<Resource>, String> {
    // The parser's budget protects against hostile YAML; an operator's file of 20,000
    // resources is not one, so the size limits grow with the input (alias and anchor
    // limits stay as they are: expansion bombs are what they guard).
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_024 + text.len() / 16;
    budget.max_nodes = 250_000 + text.len();
    budget.max_events = 1_000_000 + 4 * text.len();
    budget.max_total_scalar_bytes += text.len();
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let docs: Vec<Value> =
        serde_saphyr::from_str_multiple_with_options(text, options).map_err(|e| e.to_string())?;
    let mut items = Vec::new();
    for doc in docs {
        match doc {
            Value::Null => {}
            Value::Array(list) => items.extend(list),
            Value::Object(ref map)
                if map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                match map.get("items") {
                    Some(Value::Array(list)) => items.extend(list.iter().cloned()),
                    Some(Value::Null) | None => {}
                    Some(_) => return Err("'items' of a list must be a sequence".into()),
                }
            }
            other => items.push(other),
        }
    }
    items
        .into_iter()
        .map(|v| {
            let mut r = Resource::from_value(v).map_err(|e| e.to_string())?;
            if verb == Verb::Create {
                r.fill_for_create();
            }
            r.validate().map_err(|e| e.to_string())?;
            Ok(r)
        })
        .collect()
}

fn read_file(path: &PathBuf) -> Result<String, String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading standard input: {e}"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// The kind named in messages: the resources' kind if they all share it.
fn common_kind(resources: &[Resource]) -> Option<&'static str> {
    let first = resources.first()?.kind();
    resources
        .iter()
        .all(|r| r.kind() == first)
        .then(|| first.name())
}

/// Runs `verb` over the resources in order, stopping at the first error, and reports as
/// calicoctl does.
async fn process(
    client: &ResourceClient,
    verb: Verb,
    resources: &[Resource],
    skip: bool,
) -> Result<ExitCode, CliError> {
    if resources.is_empty() {
        return fail("No resources specified in file");
    }
    let kind = common_kind(resources);
    // create and apply go in batches (one etcd transaction per batch); the others one by
    // one, as they read before they write.
    if matches!(verb, Verb::Create | Verb::Apply) {
        let (done, error) = if verb == Verb::Create {
            client.create_all(resources, skip).await
        } else {
            client.apply_all(resources).await
        };
        if let Some(e) = error {
            return report_error(verb, kind, done, resources.len(), &e);
        }
        return succeeded(verb, kind, done);
    }
    let mut done = 0;
    for r in resources {
        let result = match verb {
            Verb::Create => client.create(r).await,
            Verb::Replace => client.replace(r).await,
            Verb::Apply => client.apply(r).await,
            Verb::Delete => client.delete(&r.id()).await,
        };
        match result {
            Ok(()) => done += 1,
            Err(ResourceError::AlreadyExists(_)) if skip && verb == Verb::Create => done += 1,
            Err(ResourceError::DoesNotExist(_)) if skip && verb == Verb::Delete => done += 1,
            Err(e) => return report_error(verb, kind, done, resources.len(), &e),
        }
    }
    succeeded(verb, kind, done)
}

fn succeeded(verb: Verb, kind: Option<&str>, done: usize) -> Result<ExitCode, CliError> {
    match kind {
        Some(k) => println!("Successfully {} {done} '{k}' resource(s)", verb.past()),
        None => println!("Successfully {} {done} resource(s)", verb.past()),
    }
    Ok(ExitCode::SUCCESS)
}

fn report_error(
    verb: Verb,
    kind: Option<&str>,
    done: usize,
    total: usize,
    e: &ResourceError,
) -> Result<ExitCode, CliError> {
    let (word, past) = (verb.word(), verb.past());
    let text = match (done, total, kind) {
        (0, 1, Some(k)) => format!("Failed to {word} '{k}' resource: {e}"),
        (0, _, Some(k)) => format!("Failed to {word} any '{k}' resources: {e}"),
        (0, _, None) => format!("Failed to {word} any resources: {e}"),
        (n, m, Some(k)) => {
            format!(
                "Partial success: {past} the first {n} out of {m} '{k}' resources:\nHit error: {e}"
            )
        }
        (n, m, None) => {
            format!("Partial success: {past} the first {n} out of {m} resources:\nHit error: {e}")
        }
    };
    fail(text)
}

async fn client(cli: &Cli) -> Result<ResourceClient, CliError> {
    let (store, _config) = connect(cli).await?;
    let store: Arc<dyn Datastore> = Arc::new(store);
    Ok(ResourceClient::new(store))
}

/// `create|replace|apply -f FILE`.
pub async fn write(cli: &Cli, verb: Verb, args: &WriteArgs) -> Result<ExitCode, CliError> {
    let started = std::time::Instant::now();
    let resources = match read_file(&args.filename).and_then(|t| parse_resources(&t, verb)) {
        Ok(r) => r,
        Err(e) => return fail(format!("Failed to execute command: {e}")),
    };
    tracing::debug!(
        resources = resources.len(),
        ms = started.elapsed().as_millis() as u64,
        "read and validated"
    );
    let client = client(cli).await?;
    process(&client, verb, &resources, args.skip_exists).await
}

fn kind_of(alias: &str) -> Result<ResourceKind, String> {
    ResourceKind::from_alias(alias)
        .ok_or_else(|| format!("Resource type '{alias}' is not supported"))
}

/// `delete -f FILE` or `delete KIND NAME`.
pub async fn delete(cli: &Cli, args: &DeleteArgs) -> Result<ExitCode, CliError> {
    let resources = if let Some(file) = &args.filename {
        match read_file(file).and_then(|t| parse_resources(&t, Verb::Delete)) {
            Ok(r) => r,
            Err(e) => return fail(format!("Failed to execute command: {e}")),
        }
    } else {
        let alias = args.kind.as_deref().unwrap_or_default();
        let kind = match kind_of(alias) {
            Ok(k) => k,
            Err(e) => return fail(format!("Failed to execute command: {e}")),
        };
        let Some(name) = &args.name else {
            return fail(format!(
                "Failed to execute command: a {} needs a name to be deleted",
                kind.name()
            ));
        };
        let client = client(cli).await?;
        let id = match kind {
            ResourceKind::IpPool => match tenet::calico::resource::parse_pool_name(name) {
                Ok(c) => ResourceId::IpPool(c),
                Err(e) => return fail(format!("Failed to execute command: {e}")),
            },
            ResourceKind::Policy => ResourceId::Policy(name.clone()),
            ResourceKind::Node => ResourceId::Node(name.clone()),
            ResourceKind::Profile => ResourceId::Profile(name.clone()),
            ResourceKind::WorkloadEndpoint => {
                let ids = &args.ids;
                let missing = [
                    (&ids.node, "node"),
                    (&ids.orchestrator, "orchestrator"),
                    (&ids.workload, "workload"),
                ]
                .into_iter()
                .find(|(v, _)| v.is_none());
                if let Some((_, field)) = missing {
                    let e = ResourceError::InsufficientIdentifiers(field);
                    return report_error(Verb::Delete, Some(kind.name()), 0, 1, &e);
                }
                ResourceId::WorkloadEndpoint(tenet::calico::WorkloadEndpointId {
                    host: ids.node.clone().unwrap_or_default(),
                    orchestrator: ids.orchestrator.clone().unwrap_or_default(),
                    workload: ids.workload.clone().unwrap_or_default(),
                    endpoint: name.clone(),
                })
            }
            ResourceKind::HostEndpoint => match &args.ids.node {
                Some(node) => ResourceId::HostEndpoint {
                    node: node.clone(),
                    name: name.clone(),
                },
                None => {
                    let e = ResourceError::InsufficientIdentifiers("node");
                    return report_error(Verb::Delete, Some(kind.name()), 0, 1, &e);
                }
            },
            ResourceKind::BgpPeer => {
                let Ok(ip) = name.parse() else {
                    return fail(format!(
                        "Failed to execute command: invalid peer IP address '{name}'"
                    ));
                };
                let scope = match (args.ids.scope.as_deref(), &args.ids.node) {
                    (Some("global") | None, None) => tenet::calico::BgpScope::Global,
                    (Some("node") | None, Some(n)) => tenet::calico::BgpScope::Host(n.clone()),
                    (Some("node"), None) => {
                        let e = ResourceError::InsufficientIdentifiers("node");
                        return report_error(Verb::Delete, Some(kind.name()), 0, 1, &e);
                    }
                    (Some("global"), Some(_)) => {
                        return fail(
                            "Failed to execute command: --node should not be given for a global peer",
                        );
                    }
                    (Some(other), _) => {
                        return fail(format!(
                            "Failed to execute command: Unrecognized scope '{other}', must be one of: global, node"
                        ));
                    }
                };
                ResourceId::BgpPeer(scope, ip)
            }
        };
        return match client.delete(&id).await {
            Ok(()) => {
                println!("Successfully deleted 1 '{}' resource(s)", kind.name());
                Ok(ExitCode::SUCCESS)
            }
            Err(ResourceError::DoesNotExist(_)) if args.skip_not_exists => {
                println!("Successfully deleted 1 '{}' resource(s)", kind.name());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => report_error(Verb::Delete, Some(kind.name()), 0, 1, &e),
        };
    };
    let client = client(cli).await?;
    process(&client, Verb::Delete, &resources, args.skip_not_exists).await
}

/// The output `-o` asks for.
enum Output {
    Table(Vec<String>),
    Yaml,
    Json,
    Template(super::template::Template),
}

fn output_of(kind: ResourceKind, spec: &str) -> Result<Output, String> {
    let columns = |c: &[&str]| c.iter().map(|s| s.to_string()).collect();
    match spec {
        "ps" => Ok(Output::Table(columns(kind.ps_columns()))),
        "wide" => Ok(Output::Table(columns(kind.wide_columns()))),
        "yaml" => Ok(Output::Yaml),
        "json" => Ok(Output::Json),
        "custom-columns" | "custom-columns=" => Err("need to specify at least one column".into()),
        s if s.starts_with("custom-columns=") => {
            let valid = kind.custom_columns();
            let mut out = Vec::new();
            for h in s["custom-columns=".len()..].split(',') {
                let h = h.trim().to_ascii_uppercase();
                if !valid.contains(&h.as_str()) {
                    return Err(format!(
                        "Unknown heading {h}, valid values are: {}",
                        valid.join(", ")
                    ));
                }
                out.push(h);
            }
            Ok(Output::Table(out))
        }
        "go-template" | "go-template=" => Err("need to specify a template".into()),
        "go-template-file" | "go-template-file=" => Err("need to specify a template file".into()),
        s if s.starts_with("go-template=") => {
            super::template::Template::parse(&s["go-template=".len()..]).map(Output::Template)
        }
        s if s.starts_with("go-template-file=") => {
            let path = &s["go-template-file=".len()..];
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read template file {path}: {e}"))?;
            super::template::Template::parse(&text).map(Output::Template)
        }
        other => Err(format!("unrecognized output format '{other}'")),
    }
}

/// Go's tabwriter as calicoctl set it up (minwidth 5, padding 3, every cell
/// tab-terminated): each column as wide as its longest cell plus 3, at least 5; a header
/// line, a line per resource, then a blank line.
pub fn render_table(headings: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headings.len())
        .map(|i| {
            let longest = rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain(std::iter::once(headings[i].chars().count()))
                .max()
                .unwrap_or(0);
            (longest + 3).max(5)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<String>()
    };
    let mut out = line(headings) + "\n";
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push('\n');
    out
}

/// `get KIND [NAME] [-o …]`.
pub async fn get(cli: &Cli, args: &GetArgs) -> Result<ExitCode, CliError> {
    let kind = match kind_of(&args.kind) {
        Ok(k) => k,
        Err(e) => return fail(format!("Failed to execute command: {e}")),
    };
    let output = match output_of(kind, &args.output) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let client = client(cli).await?;
    let resources = match client
        .list_where(kind, args.name.as_deref(), &args.ids.to_identifiers())
        .await
    {
        Ok(r) => r,
        Err(e @ ResourceError::Invalid(_)) => {
            return fail(format!("Failed to execute command: {e}"));
        }
        Err(e) => return fail(format!("Failed to get resources: {e}")),
    };
    match output {
        Output::Table(headings) => {
            // A node without an AS number of its own shows the global one in parentheses.
            let global_asn = if kind == ResourceKind::Node && headings.iter().any(|h| h == "ASN") {
                match client.global_asn().await {
                    Ok(a) => Some(a),
                    Err(e) => return fail(format!("Failed to get resources: {e}")),
                }
            } else {
                None
            };
            let rows: Vec<Vec<String>> = resources
                .iter()
                .map(|r| {
                    headings
                        .iter()
                        .map(|h| r.table_cell(h, global_asn).unwrap_or_default())
                        .collect()
                })
                .collect();
            print!("{}", render_table(&headings, &rows));
        }
        Output::Template(t) => {
            let data = serde_json::to_value(&resources).expect("resources serialise");
            match t.render(&data) {
                Ok(text) => print!("{text}"),
                Err(e) => return fail(format!("Failed to execute command: {e}")),
            }
        }
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&resources).expect("resources serialise")
        ),
        Output::Yaml => {
            // calicoctl converted JSON to YAML: maps come out in alphabetical order.
            let sorted = serde_json::to_value(&resources).expect("resources serialise");
            match &sorted {
                Value::Array(a) if a.is_empty() => println!("[]"),
                _ => print!(
                    "{}",
                    serde_saphyr::to_string(&sorted).expect("YAML serialises")
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_like_gos_tabwriter() {
        // calico-data-model.md §7.6: `get ippool -o wide`, one pool, nat and ipip on.
        let t = render_table(
            &["CIDR".into(), "NAT".into(), "IPIP".into()],
            &[vec!["192.168.0.0/16".into(), "true".into(), "true".into()]],
        );
        assert_eq!(
            t,
            "CIDR             NAT    IPIP   \n192.168.0.0/16   true   true   \n\n"
        );
    }

    #[test]
    fn files_hold_documents_lists_and_kind_lists() {
        let text = "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.1.0.0/16}\n---\n- apiVersion: v1\n  kind: ipPool\n  metadata: {cidr: 10.2.0.0/16}\n---\nkind: ipPoolList\napiVersion: v1\nitems:\n- {apiVersion: v1, kind: ipPool, metadata: {cidr: 10.3.0.0/16}}\n";
        let r = parse_resources(text, Verb::Apply).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].id().to_string(), "IPPool(cidr=10.3.0.0/16)");
        // JSON is read too.
        let json = r#"[{"apiVersion":"v1","kind":"ipPool","metadata":{"cidr":"10.4.0.0/16"},"spec":{"nat-outgoing":true}}]"#;
        assert_eq!(parse_resources(json, Verb::Apply).unwrap().len(), 1);
        // One bad resource fails the whole file.
        let bad =
            format!("{text}---\napiVersion: v1\nkind: ipPool\nmetadata: {{cidr: 10.5.0.1/16}}\n");
        assert!(
            parse_resources(&bad, Verb::Apply)
                .unwrap_err()
                .contains("not strictly masked")
        );
    }

    #[test]
    fn output_formats_and_their_errors() {
        let k = ResourceKind::IpPool;
        assert!(matches!(output_of(k, "wide"), Ok(Output::Table(c)) if c.len() == 3));
        assert!(
            matches!(output_of(k, "custom-columns=ipip,cidr"), Ok(Output::Table(c)) if c == ["IPIP", "CIDR"])
        );
        assert_eq!(
            output_of(k, "custom-columns=FOO").err().unwrap(),
            "Unknown heading FOO, valid values are: CIDR, NAT, IPIP"
        );
        assert_eq!(
            output_of(k, "custom-columns").err().unwrap(),
            "need to specify at least one column"
        );
        assert_eq!(
            output_of(k, "xml").err().unwrap(),
            "unrecognized output format 'xml'"
        );
    }
}
