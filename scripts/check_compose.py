#!/usr/bin/env python3
"""Checks docker-compose.yml without a Docker engine.

- the file parses and validates (`docker-compose config -q`, Debian package docker-compose);
- every image is pinned (a tag other than `latest`, or a digest), Dockerfile bases too;
- every environment variable given to a gateway or simulator service is one its binary
  reads (from the `[env: NAME=]` lines of its `--help`), or RUST_LOG;
- every host:port in service environments, healthchecks, prometheus/prometheus.yml and the
  Grafana datasources names a compose service and a port that service `expose`s;
- every published port is bound to 127.0.0.1;
- the file is valid against the Compose specification's JSON schema (the copy Debian's
  docker-compose ships), which Docker Compose v2 reads it by;
- Compose v2 fields the old tool ignores: a service scaled by `deploy.replicas` publishes
  no fixed host port, has no `container_name`, and Prometheus finds its replicas through
  DNS service discovery (a static target reaches one replica at a time);
- first-run behaviour: long-running services restart, a `pg_isready` healthcheck asks over
  TCP (`-h`), `.dockerignore` keeps `target/` out of the build context.

Usage: check_compose.py COMPOSE_FILE --gateway-bin PATH --sim-bin PATH --payctl-bin PATH
Prints each problem and exits 1 if there are any; exits 2 if a tool is missing.
"""

import argparse
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError:
    print("check_compose: PyYAML is missing: apt-get install python3-yaml (or pip install pyyaml)")
    sys.exit(2)

HOSTPORT = re.compile(r"(?:[a-z]+://)?(?:[^@/\s]+@)?([A-Za-z][A-Za-z0-9_.-]*):(\d+)")
LOCAL = {"localhost", "127.0.0.1", "0.0.0.0"}


def env_vars_of(binary, subcommands):
    names = set()
    for sub in subcommands:
        out = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, check=True).stdout
        names |= set(re.findall(r"\[env: ([A-Z0-9_]+)=?", out))
    return names


def as_dict(env):
    if isinstance(env, dict):
        return {k: "" if v is None else str(v) for k, v in env.items()}
    return dict(e.split("=", 1) if "=" in e else (e, "") for e in env or [])


SCHEMAS = ["/usr/lib/python3/dist-packages/compose/config/compose_spec.json"]


def schema_problems(doc):
    """Validates against the Compose specification (Docker Compose v2 reads files by it)."""
    try:
        import jsonschema
    except ImportError:
        print("check_compose: jsonschema is missing: apt-get install docker-compose (brings python3-jsonschema)")
        sys.exit(2)
    schema_file = next((p for p in SCHEMAS if os.path.exists(p)), None)
    if schema_file is None:
        print(f"check_compose: no Compose schema at {SCHEMAS}: apt-get install docker-compose")
        sys.exit(2)
    import json

    with open(schema_file) as f:
        schema = json.load(f)
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"the Compose specification rejects {'/'.join(map(str, e.path)) or 'the file'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("compose")
    ap.add_argument("--gateway-bin", required=True)
    ap.add_argument("--sim-bin", required=True)
    ap.add_argument("--payctl-bin", required=True)
    a = ap.parse_args()
    root = os.path.dirname(os.path.abspath(a.compose))
    problems = []

    try:
        res = subprocess.run(["docker-compose", "-f", a.compose, "config", "-q"], capture_output=True, text=True)
    except FileNotFoundError:
        print("check_compose: docker-compose not found: apt-get install docker-compose")
        return 2
    if res.returncode != 0:
        problems.append(f"docker-compose config rejects the file: {res.stderr.strip()}")

    with open(a.compose) as f:
        doc = yaml.safe_load(f)
    services = doc.get("services", {})
    problems += schema_problems(doc)
    replicas = {n: int((s.get("deploy") or {}).get("replicas", 1)) for n, s in services.items()}
    # One-shot services: others wait for them to complete (kafka-init).
    completed_deps = {
        dep
        for s in services.values()
        if isinstance(s.get("depends_on"), dict)
        for dep, c in s["depends_on"].items()
        if (c or {}).get("condition") == "service_completed_successfully"
    }
    exposed = {name: {str(p) for p in s.get("expose", [])} for name, s in services.items()}

    gateway_env = env_vars_of(a.gateway_bin, [[], ["api"], ["worker"], ["sink"], ["all"]]) | {"RUST_LOG"}
    sim_env = env_vars_of(a.sim_bin, [[]]) | {"RUST_LOG"}
    payctl_env = env_vars_of(a.payctl_bin, [[], ["ui"], ["load"]]) | {"RUST_LOG"}
    binaries = {"provider-sim": ("provider-sim", sim_env), "payctl": ("payctl", payctl_env)}

    def check_target(where, text):
        for host, port in HOSTPORT.findall(text):
            if host in LOCAL or "." in host and host not in services:
                continue
            if host not in services:
                problems.append(f"{where}: host `{host}` is not a compose service")
            elif port not in exposed[host]:
                problems.append(f"{where}: `{host}:{port}` but service `{host}` exposes {sorted(exposed[host]) or 'nothing'}")

    # Kafka: the image runs the release the tests run (kafka/pom.xml pins it), and the
    # changelog is created compacted, as the test kit creates it.
    try:
        with open(os.path.join(root, "kafka", "pom.xml")) as f:
            pom = f.read()
    except OSError:
        pom = ""
    m = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", pom)
    tested = m.group(1) if m else None
    if not tested:
        problems.append("kafka/pom.xml names no org.apache.kafka:kafka_2.13 version")
    for name, s in services.items():
        image = s.get("image") or ""
        if image.startswith("apache/kafka:") and tested and image.split(":", 1)[1] != tested:
            problems.append(
                f"service `{name}`: image `{image}` is not the Kafka the tests run ({tested}, kafka/pom.xml)"
            )
    init = " ".join(str(c) for c in (services.get("kafka-init", {}).get("command") or []))
    if "-changelog" in init and "cleanup.policy=compact" not in init:
        problems.append("service `kafka-init`: the changelog topic is not created with cleanup.policy=compact")

    for name, s in services.items():
        image = s.get("image")
        if image and "@sha256:" not in image:
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else None
            if tag in (None, "latest"):
                problems.append(f"service `{name}`: image `{image}` is not pinned to a version")
        if not image and "build" not in s:
            problems.append(f"service `{name}`: neither image nor build")
        entry = s.get("entrypoint") or []
        entry = entry if isinstance(entry, list) else [entry]
        is_gateway = "build" in s or (image or "").startswith("payment-gateway")
        env = as_dict(s.get("environment"))
        if is_gateway:
            binary, known = binaries.get((entry or ["gateway"])[0], ("gateway", gateway_env))
            for var in env:
                if var not in known:
                    problems.append(f"service `{name}`: environment variable {var} is not read by {binary}")
        for var, value in env.items():
            check_target(f"service `{name}` {var}", value)
        hc = s.get("healthcheck", {}).get("test")
        if hc:
            check_target(f"service `{name}` healthcheck", " ".join(hc) if isinstance(hc, list) else hc)
        for p in s.get("ports", []):
            if not str(p).startswith("127.0.0.1:"):
                problems.append(f"service `{name}`: port {p} must be bound to 127.0.0.1")
        if replicas[name] > 1:
            if s.get("ports"):
                problems.append(f"service `{name}`: {replicas[name]} replicas cannot all publish host ports {s['ports']}")
            if "container_name" in s:
                problems.append(f"service `{name}`: {replicas[name]} replicas cannot share container_name")
        one_shot = name in completed_deps
        restart = s.get("restart", "no")
        if not one_shot and restart not in ("always", "unless-stopped"):
            problems.append(f"service `{name}`: restart policy `{restart}`; a long-running service needs unless-stopped")
        hc_text = " ".join(hc) if isinstance(hc, list) else (hc or "")
        if "pg_isready" in hc_text and not re.search(r"pg_isready\b.*\s(-h|--host)\b", hc_text):
            problems.append(
                f"service `{name}`: pg_isready without -h checks the socket, where the image's init server "
                "answers before the real server is up: add -h 127.0.0.1"
            )

    with open(os.path.join(root, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    discovered = set()
    for job in prom.get("scrape_configs", []):
        where = f"prometheus job `{job['job_name']}`"
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                check_target(where, t)
                host = t.split(":")[0]
                if replicas.get(host, 1) > 1:
                    problems.append(
                        f"{where}: static target `{t}` reaches one of service `{host}`'s {replicas[host]} replicas "
                        "at a time: use dns_sd_configs (type A)"
                    )
        for sd in job.get("dns_sd_configs", []):
            if sd.get("type") != "A" or "port" not in sd:
                problems.append(f"{where}: dns_sd_configs must be type A with a port (Docker's DNS has no SRV records)")
            for n in sd.get("names", []):
                check_target(where, f"{n}:{sd.get('port')}")
                discovered.add(n)
    for name, n in replicas.items():
        if n > 1 and services[name].get("expose") and name not in discovered:
            problems.append(f"service `{name}` ({n} replicas) is not scraped through dns_sd_configs")
    ds_file = os.path.join(root, "grafana", "provisioning", "datasources", "datasources.yml")
    with open(ds_file) as f:
        for ds in yaml.safe_load(f).get("datasources", []):
            check_target(f"grafana datasource `{ds['name']}`", ds.get("url", ""))

    ignore_file = os.path.join(root, ".dockerignore")
    ignores = []
    if os.path.exists(ignore_file):
        with open(ignore_file) as f:
            ignores = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    if not any(p.strip("/") == "target" for p in ignores):
        problems.append(".dockerignore must exclude target/ (a developer's build output would be sent as build context)")

    with open(os.path.join(root, "Dockerfile")) as f:
        for line in f:
            m = re.match(r"\s*FROM\s+(\S+)", line, re.I)
            if m and (":" not in m.group(1) or m.group(1).endswith(":latest")):
                problems.append(f"Dockerfile: base image `{m.group(1)}` is not pinned")

    for p in problems:
        print(f"compose check: {p}")
    print(f"compose check: {len(services)} services, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
