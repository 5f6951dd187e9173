//! Policy at scale: `cargo bench --bench policy` (root: programs a scratch namespace).
//!
//! 10,000 workload endpoints over 100 hosts (this host holds 250), 1,000 policies and 200
//! profiles, as `/calico/v1` keys and values. Measured: the initial calculation, the size of
//! what this host applies and the time to apply it (ipset restore + iptables-restore); then
//! 200 single changes (a remote endpoint relabelled, a policy rule changed, an endpoint
//! added here or elsewhere), each timed for the calculation and until the kernel has it
//! (p50/p99); next to the naive engine measured in the same run: every change recomputed
//! from all keys and the whole state re-applied. `TENET_BENCH_POLICY_SCALE` scales the
//! counts (e.g. 0.1).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tenet::policy::calc::{CalcConfig, CalcGraph, Input};
use tenet::policy::dataplane::PolicyDataplane;
use tenet::policy::proto::to_dataplane::Payload;
use tenet::policy::render::WorkloadHook;
use tenet::testbed::Netns;

const HOST: &str = "h0";

struct Model {
    keys: BTreeMap<String, String>,
    endpoints: usize,
    profiles: usize,
}

fn wep_key(host: usize, i: usize) -> String {
    format!("/calico/v1/host/h{host}/workload/ciao/w{i}/endpoint/e{i}")
}

fn wep_value(i: usize, role: usize, profiles: usize) -> String {
    format!(
        r#"{{"state":"active","name":"tvn_{i:08x}","active_instance_id":"","mac":null,"profile_ids":["prof{}"],"ipv4_nets":["10.{}.{}.{}/32"],"ipv6_nets":[],"labels":{{"app":"a{}","role":"r{role}"}}}}"#,
        i % profiles,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255,
        i % 50,
    )
}

fn policy_key(i: usize) -> String {
    format!("/calico/v1/policy/tier/default/policy/pol{i}")
}

fn policy_value(i: usize, port: usize) -> String {
    format!(
        r#"{{"order":{i},"selector":"app == 'a{}'","inbound_rules":[{{"action":"allow","protocol":"tcp","src_selector":"role == 'r{}'","dst_ports":[{port}]}}],"outbound_rules":[{{"action":"allow"}}],"types":["ingress","egress"]}}"#,
        i % 50,
        i % 300,
    )
}

fn model(scale: f64, local: usize) -> Model {
    let n = |x: f64| ((x * scale) as usize).max(1);
    let (endpoints, policies, profiles, hosts) = (n(10_000.0), n(1_000.0), n(200.0), n(100.0));
    let mut keys = BTreeMap::new();
    for p in 0..profiles {
        let base = format!("/calico/v1/policy/profile/prof{p}");
        keys.insert(format!("{base}/tags"), format!(r#"["t{p}"]"#));
        keys.insert(format!("{base}/labels"), format!(r#"{{"group":"g{p}"}}"#));
        keys.insert(
            format!("{base}/rules"),
            format!(
                r#"{{"inbound_rules":[{{"action":"allow","protocol":"tcp","src_tag":"t{}","dst_ports":[80]}}],"outbound_rules":[{{"action":"allow"}}]}}"#,
                (p + 1) % profiles
            ),
        );
    }
    for i in 0..policies {
        keys.insert(policy_key(i), policy_value(i, 8000 + i % 100));
    }
    for i in 0..endpoints {
        // The first `local` endpoints are this host's; the rest spread over the others.
        let host = if i < local {
            0
        } else {
            1 + i % (hosts - 1).max(1)
        };
        keys.insert(wep_key(host, i), wep_value(i, i % 300, profiles));
    }
    Model {
        keys,
        endpoints,
        profiles,
    }
}

fn calc_config() -> CalcConfig {
    CalcConfig {
        hostname: HOST.into(),
        scope_label: None,
    }
}

fn full_calc(model: &Model) -> (CalcGraph, Vec<Payload>) {
    let mut g = CalcGraph::new(calc_config());
    for (k, v) in &model.keys {
        if let Some(input) = Input::from_kv(k, Some(v.as_bytes())) {
            g.apply(input);
        }
    }
    g.apply(Input::InSync);
    let msgs = g.flush();
    (g, msgs)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// One single change: the key and value to write.
fn change(model: &Model, n: usize) -> (String, String) {
    let endpoints = model.endpoints;
    match n % 4 {
        // A remote endpoint relabelled: moves between IP sets.
        0 => {
            let i = endpoints / 2 + n;
            let host = 1 + i % 99;
            (
                wep_key(host, i),
                wep_value(i, (i + n + 1) % 300, model.profiles),
            )
        }
        // A rule of an active policy changes.
        1 => (policy_key(n % 50), policy_value(n % 50, 9000 + n)),
        // An endpoint added on another host.
        2 => (
            wep_key(1 + n % 99, endpoints + n),
            wep_value(endpoints + n, n % 300, model.profiles),
        ),
        // An endpoint added here.
        _ => (
            wep_key(0, endpoints + n),
            wep_value(endpoints + n, n % 300, model.profiles),
        ),
    }
}

fn main() {
    let scale: f64 = std::env::var("TENET_BENCH_POLICY_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let local = ((250.0 * scale) as usize).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut model = model(scale, local);
    let ns = Netns::create("polbench").unwrap();
    let hook = WorkloadHook::Bridged {
        prefixes: vec!["tvn_".into()],
    };

    // Initial calculation and apply.
    let t = Instant::now();
    let (mut graph, msgs) = full_calc(&model);
    let initial_calc = t.elapsed();
    let stats = graph.stats();
    let mut dp = rt
        .block_on(PolicyDataplane::new(Some(&ns.path()), hook.clone(), None))
        .unwrap();
    let message_count = msgs.len();
    for m in msgs {
        dp.handle(m);
    }
    let t = Instant::now();
    let report = rt.block_on(dp.apply()).unwrap();
    let initial_apply = t.elapsed();
    let rules: usize = tenet::policy::render::render(dp.state(), &dp.render_config())
        .chains
        .values()
        .map(|r| r.len())
        .sum();

    // Single changes, incrementally.
    let changes = 200;
    let (mut calc_times, mut kernel_times) = (Vec::new(), Vec::new());
    // Per kind of change (n % 4): calculation and kernel times.
    let mut by_kind: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); 4];
    for n in 0..changes {
        let (k, v) = change(&model, n);
        let t = Instant::now();
        if let Some(input) = Input::from_kv(&k, Some(v.as_bytes())) {
            graph.apply(input);
        }
        let out = graph.flush();
        let calc = t.elapsed();
        for m in out {
            dp.handle(m);
        }
        rt.block_on(dp.apply()).unwrap();
        calc_times.push(calc);
        kernel_times.push(t.elapsed());
        by_kind[n % 4].0.push(calc);
        by_kind[n % 4].1.push(t.elapsed());
        model.keys.insert(k, v);
    }
    calc_times.sort();
    kernel_times.sort();

    // The naive engine: every change recomputed from all keys and re-applied whole.
    let naive_changes = 10;
    let (mut naive_calc, mut naive_kernel) = (Vec::new(), Vec::new());
    for n in changes..changes + naive_changes {
        let (k, v) = change(&model, n);
        model.keys.insert(k, v);
        let t = Instant::now();
        let (_, msgs) = full_calc(&model);
        let calc = t.elapsed();
        dp.reset();
        for m in msgs {
            dp.handle(m);
        }
        rt.block_on(dp.reconcile()).unwrap();
        naive_calc.push(calc);
        naive_kernel.push(t.elapsed());
    }
    naive_calc.sort();
    naive_kernel.sort();
    rt.block_on(dp.remove()).unwrap();

    println!(
        "policy: {} endpoints over 100 hosts ({} here), {} policies, {} profiles (scale {scale})",
        model.endpoints,
        local,
        (1000.0 * scale) as usize,
        (200.0 * scale) as usize
    );
    println!(
        "initial: calculation {} ms → {} messages; active {} policies, {} profiles, {} IP sets \
         with {} members; {} rules, {} ipset lines; applied in {} ms",
        ms(initial_calc),
        message_count,
        stats.active_policies,
        stats.active_profiles,
        stats.ip_sets,
        stats.ip_set_members,
        rules,
        report.ipset_lines,
        ms(initial_apply)
    );
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>12}",
        "single change (ms)", "calc p50", "calc p99", "kernel p50", "kernel p99"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>12}",
        format!("incremental ({changes} changes)"),
        ms(percentile(&calc_times, 0.5)),
        ms(percentile(&calc_times, 0.99)),
        ms(percentile(&kernel_times, 0.5)),
        ms(percentile(&kernel_times, 0.99)),
    );
    let kinds = [
        "  a remote endpoint relabelled",
        "  a policy rule changed",
        "  an endpoint added on another host",
        "  an endpoint added here",
    ];
    for (name, (mut calc, mut kernel)) in kinds.iter().zip(by_kind) {
        calc.sort();
        kernel.sort();
        println!(
            "{:<44} {:>10} {:>10} {:>12} {:>12}",
            format!("{name} ({})", calc.len()),
            ms(percentile(&calc, 0.5)),
            ms(percentile(&calc, 0.99)),
            ms(percentile(&kernel, 0.5)),
            ms(percentile(&kernel, 0.99)),
        );
    }
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>12}",
        format!("naive: recompute + re-apply ({naive_changes} changes)"),
        ms(percentile(&naive_calc, 0.5)),
        ms(percentile(&naive_calc, 0.99)),
        ms(percentile(&naive_kernel, 0.5)),
        ms(percentile(&naive_kernel, 0.99)),
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!();
    println!(
        "incremental is {:.0}× cheaper to calculate and {:.0}× faster to the kernel (p50); \
         goals: kernel p99 < 100 ms, ≥ 50×",
        ratio(percentile(&naive_calc, 0.5), percentile(&calc_times, 0.5)),
        ratio(
            percentile(&naive_kernel, 0.5),
            percentile(&kernel_times, 0.5)
        ),
    );
}
