//! `make bench` on a small run: every role of the system under test is a process of its
//! own, pinned apart from the load generator, and each one's CPU time per payment is
//! reported (the figures themselves are the benchmark's, never asserted here).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// The `key=value` fields of the first stdout line starting with `prefix`.
fn fields<'a>(stdout: &'a str, prefix: &str) -> HashMap<&'a str, &'a str> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in the bench's output:\n{stdout}"));
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

fn number(f: &HashMap<&str, &str>, key: &str) -> f64 {
    let v = f.get(key).unwrap_or_else(|| panic!("no {key}= in {f:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} is not a number (in {f:?})"))
}

#[test]
fn a_bench_run_charges_each_process_of_the_system_its_cpu_time_and_pins_the_generator_apart() {
    let bench = Path::new(env!("CARGO_BIN_EXE_bench"));
    for sibling in ["gateway", "provider-sim"] {
        assert!(
            bench.with_file_name(sibling).exists(),
            "{sibling} is not built beside the bench ({}): build every binary first (`cargo build --workspace --bins`, as make test does)",
            bench.display()
        );
    }
    let out = Command::new(bench)
        .args([
            "--rate",
            "0",
            "--payments",
            "300",
            "--concurrency",
            "16",
            "--partitions",
            "2",
            "--skip-raw",
        ])
        .output()
        .expect("the bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("{stdout}");

    let bench_line = fields(&stdout, "bench: ");
    assert_eq!(bench_line.get("payments"), Some(&"300"), "{bench_line:?}");
    let cpus = testkit::cpu::online_cpus();
    let pinned = if cpus >= 2 {
        format!(
            "generator:0,system:{}",
            if cpus == 2 {
                "1".to_owned()
            } else {
                format!("1-{}", cpus - 1)
            }
        )
    } else {
        "off(one-cpu)".to_owned()
    };
    assert_eq!(bench_line.get("pinning").copied(), Some(pinned.as_str()));

    let cost = fields(&stdout, "bench-cost: ");
    assert_eq!(cost.get("load"), Some(&"max"));
    let total = number(&cost, "cpu_ms_per_payment");
    assert!(total > 0.0, "no CPU time was charged: {cost:?}");
    // Every payment goes through the worker, the API and the sink: each must have been
    // charged some time, as must the broker and PostgreSQL unless the environment names
    // them (not this machine's processes, which the bench says with `-`).
    let mut sum = 0.0;
    for component in ["worker", "api", "sink", "notifier", "sim"] {
        let ms = number(&cost, component);
        assert!(ms >= 0.0, "{component}={ms}");
        sum += ms;
    }
    for busy in ["worker", "api", "sink"] {
        assert!(
            number(&cost, busy) > 0.0,
            "{busy} was charged nothing: {cost:?}"
        );
    }
    for (component, var) in [("broker", "KAFKA_BROKERS"), ("pg", "DATABASE_URL")] {
        if std::env::var_os(var).is_some() {
            assert_eq!(cost.get(component), Some(&"-"), "{var} is set: {cost:?}");
        } else {
            let ms = number(&cost, component);
            assert!(ms > 0.0, "{component} was charged nothing: {cost:?}");
            sum += ms;
        }
    }
    assert!(
        (sum - total).abs() <= 0.001 * 7.0 + total * 0.001,
        "the components ({sum:.3}) do not add up to the total ({total:.3}): {cost:?}"
    );
    assert!(number(&cost, "generator") >= 0.0);
    assert!(number(&cost, "busy_cpus") > 0.0);
}
