#!/usr/bin/env python3
"""Checks docker-compose.yml without a Docker engine.

- the file parses and validates (`docker-compose config -q`, Debian package docker-compose);
- every image is pinned (a tag other than `latest`, or a digest), Dockerfile bases too;
- every environment variable given to a gateway or simulator service is one its binary
  reads (from the `[env: NAME=]` lines of its `--help`), or RUST_LOG;
- every host:port in service environments, healthchecks, prometheus/prometheus.yml and the
  Grafana datasources names a compose service and a port that service `expose`s;
- every published port is bound to 127.0.0.1.

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

    with open(os.path.join(root, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                check_target(f"prometheus job `{job['job_name']}`", t)
    ds_file = os.path.join(root, "grafana", "provisioning", "datasources", "datasources.yml")
    with open(ds_file) as f:
        for ds in yaml.safe_load(f).get("datasources", []):
            check_target(f"grafana datasource `{ds['name']}`", ds.get("url", ""))

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
