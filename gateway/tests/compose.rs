//! The compose check (scripts/check_compose.py) passes on docker-compose.yml and fails,
//! naming each problem, on a deliberately broken copy; the Dockerfile check
//! (scripts/check_dockerfile.py, run whole by `make docker-check`) fails on a Dockerfile
//! whose dependency layer misses a workspace member.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Python that has PyYAML (the one on PATH, or Debian's, which docker-compose brings).
fn python() -> String {
    for p in ["python3", "/usr/bin/python3"] {
        if Command::new(p)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return p.to_owned();
        }
    }
    panic!("no python3 with PyYAML: apt-get install docker-compose (brings python3-yaml)");
}

fn check(compose: &Path) -> (bool, String) {
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    let sim = gateway.with_file_name("provider-sim");
    let payctl = gateway.with_file_name("payctl");
    for (bin, package) in [(&sim, "simulator"), (&payctl, "payment-client")] {
        assert!(
            bin.exists(),
            "{} is not built: cargo build -p {package}",
            bin.display()
        );
    }
    let out = Command::new(python())
        .arg(repo().join("scripts/check_compose.py"))
        .arg(compose)
        .arg("--gateway-bin")
        .arg(&gateway)
        .arg("--sim-bin")
        .arg(&sim)
        .arg("--payctl-bin")
        .arg(&payctl)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "a tool is missing: {text}");
    (out.status.success(), text)
}

#[test]
fn the_compose_file_passes_the_check() {
    let (ok, text) = check(&repo().join("docker-compose.yml"));
    assert!(ok, "{text}");
    println!("{}", text.trim());
}

#[test]
fn a_broken_compose_file_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let broken = original
        .replace(
            "image: prom/prometheus:v2.54.1",
            "image: prom/prometheus:latest",
        )
        .replace("image: apache/kafka:4.4.0", "image: apache/kafka:3.9.0")
        .replace(
            "      PROVIDER_URL: http://provider-sim:9090",
            "      PROVIDER_URL: http://provider-sim:9999\n      PROVIDR_URL: x",
        )
        .replace("ports: [\"127.0.0.1:3000:3000\"]", "ports: [\"3000:3000\"]")
        .replace(
            "depends_on: [prometheus]",
            "depends_on: [prometheus, grafana-db]\n    restarts: always",
        )
        .replace("pg_isready -h 127.0.0.1 -U", "pg_isready -U")
        .replace(
            "image: postgres:15.8-bookworm\n    restart: unless-stopped\n",
            "image: postgres:15.8-bookworm\n",
        );
    assert_ne!(broken, original);
    std::fs::write(dir.path().join("docker-compose.yml"), broken).unwrap();
    std::fs::copy(repo().join("Dockerfile"), dir.path().join("Dockerfile")).unwrap();
    for sub in ["prometheus", "grafana/provisioning/datasources", "kafka"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(repo().join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    // A static target for the scaled workers; no .dockerignore in the copy.
    let prometheus = dir.path().join("prometheus/prometheus.yml");
    let scrape = std::fs::read_to_string(&prometheus).unwrap();
    let static_workers = scrape.replace(
        "    dns_sd_configs:\n      - names: [\"worker\"]\n        type: A\n        port: 9101\n",
        "    static_configs:\n      - targets: [\"worker:9101\"]\n",
    );
    assert_ne!(static_workers, scrape);
    std::fs::write(
        &prometheus,
        static_workers.replace("        refresh_interval: 15s\n", ""),
    )
    .unwrap();
    let (ok, text) = check(&dir.path().join("docker-compose.yml"));
    assert!(!ok, "the broken copy passed: {text}");
    for expected in [
        "image `prom/prometheus:latest` is not pinned",
        "environment variable PROVIDR_URL is not read by gateway",
        "`provider-sim:9999` but service `provider-sim` exposes ['9090']",
        "port 3000:3000 must be bound to 127.0.0.1",
        "docker-compose config rejects the file",
        "the Compose specification rejects services/grafana: 'restarts' does not match",
        "service `postgres`: pg_isready without -h checks the socket",
        "service `postgres`: restart policy `no`",
        "static target `worker:9101` reaches one of service `worker`'s 2 replicas",
        "service `worker` (2 replicas) is not scraped through dns_sd_configs",
        ".dockerignore must exclude target/",
        "image `apache/kafka:3.9.0` is not the Kafka the tests run (4.4.0, kafka/pom.xml)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The Dockerfile as it was when the dependency layer missed `telemetry` (a workspace
/// member added later): both the structural check and the replayed build name it.
#[test]
fn the_dockerfile_check_names_a_member_missing_from_the_dependency_layer() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let broken = original
        .replace("COPY telemetry/Cargo.toml telemetry/\n", "")
        .replace(" client telemetry; do", " client; do");
    assert_ne!(broken, original);
    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, broken).unwrap();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    let out = Command::new(python())
        .arg(repo().join("scripts/check_dockerfile.py"))
        .arg("--dockerfile")
        .arg(&dockerfile)
        .arg("--context")
        .arg(repo())
        .arg("--bin-dir")
        .arg(bin_dir.parent().unwrap())
        .arg("--quiet")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "a tool is missing: {text}");
    assert!(
        !out.status.success(),
        "the broken Dockerfile passed: {text}"
    );
    for expected in [
        "workspace member `telemetry` is not in the dependency layer",
        "failed to read",
        "telemetry/Cargo.toml",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The Jaeger compose runs is the one the tests build and read traces back from: the
/// image's tag and jaeger/go.mod's module version are the two tags of one release
/// (`testkit::jaeger::JAEGER_RELEASE` says which, and why they differ), and the
/// Makefile's cache of the binary is named for that version.
#[test]
fn the_compose_jaeger_is_the_jaeger_the_tests_build() {
    let release = testkit::jaeger::JAEGER_RELEASE;
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: jaegertracing/jaeger:"))
        .collect();
    assert_eq!(
        images,
        vec![release.image],
        "docker-compose.yml's Jaeger image is not jaegertracing/jaeger:{} (the Jaeger 2 tag of \
         github.com/jaegertracing/jaeger {}, which the tests build): change both, and JAEGER_RELEASE",
        release.image,
        release.go_module
    );
    let go_mod = std::fs::read_to_string(repo().join("jaeger/go.mod")).unwrap();
    let required: Vec<&str> = go_mod
        .lines()
        .filter_map(|l| l.trim().strip_prefix("github.com/jaegertracing/jaeger "))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        required,
        vec![release.go_module],
        "jaeger/go.mod does not build github.com/jaegertracing/jaeger {} (the Go module tag of \
         Jaeger {}, which compose runs): change both, and JAEGER_RELEASE",
        release.go_module,
        release.image
    );
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    let cache = format!(
        "/payment-gateway/jaeger-{}/jaeger",
        release.go_module.trim_start_matches('v')
    );
    assert!(
        makefile.contains(&cache),
        "the Makefile's JAEGER_BIN is not named for {}: {cache}",
        release.go_module
    );
}
