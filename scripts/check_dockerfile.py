#!/usr/bin/env python3
"""Executes the Dockerfile's build stage as far as a machine without a Docker engine can.

Structure:
- every workspace member's Cargo.toml is copied into the dependency layer, and the
  layer's stub sources give it a src/lib.rs;
- every base image is pinned.

Build stage, replayed in a scratch directory: each `COPY` (honouring .dockerignore) and
each `RUN` runs in order, with the stage's `WORKDIR`, against this machine's Rust and
crate cache (offline). `cargo build` runs as `cargo metadata --locked` followed by
`cargo check` of the same packages, so a manifest the layer forgot fails as it would in
`docker build`, without a release build's time.

Runtime stage:
- every program the compose file runs from the gateway image (entrypoints, and the
  healthchecks' commands) is copied from the build stage into the PATH, or installed by
  the stage's `apt-get install`;
- every shared library `ldd` lists for the built binaries belongs to a Debian package
  the runtime image has: the minimal base (Essential and required packages) or the
  stage's `apt-get install` list, with their dependencies.

Usage: check_dockerfile.py [--dockerfile F] [--compose F] [--bin-dir DIR]
                           [--target-dir DIR] [--structure-only]
Prints each problem and exits 1 if there are any; exits 2 if a tool is missing.
"""

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

try:
    import yaml
except ImportError:
    print("dockerfile check: PyYAML is missing: apt-get install python3-yaml (or pip install pyyaml)")
    sys.exit(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instructions(path):
    """The Dockerfile as (keyword, argument text) pairs, continuations joined."""
    out, pending = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            text = (pending + line).strip()
            pending = ""
            keyword, _, rest = text.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(instrs):
    """[(base image, alias, [instructions])]."""
    result = []
    for kw, rest in instrs:
        if kw == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append((parts[0], alias, []))
        elif result:
            result[-1][2].append((kw, rest))
    return result


def copy_args(rest):
    """(flags, sources, destination) of a COPY (shell or JSON form)."""
    if rest.startswith("["):
        import json

        words = json.loads(rest)
    else:
        words = shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def workspace_members(cargo_toml):
    with open(cargo_toml, "rb") as f:
        return tomllib.load(f)["workspace"]["members"]


def dockerignore(context):
    path = os.path.join(context, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")]


def ignored(rel, patterns):
    parts = rel.split("/")
    for p in patterns:
        p = p.lstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i - 1], p[3:])):
                return True
    return False


def copy_into(context, patterns, sources, dest, root, workdir):
    """Copies sources from the build context as `COPY` does (a directory's contents)."""
    target = dest if dest.startswith("/") else os.path.join(workdir, dest)
    target = os.path.join(root, target.lstrip("/"))
    many = len(sources) > 1 or dest.endswith("/")
    for src in sources:
        full = os.path.normpath(os.path.join(context, src))
        if not os.path.exists(full):
            return f"COPY {src}: not in the build context"
        rel = os.path.relpath(full, context)
        if rel != "." and ignored(rel, patterns):
            return f"COPY {src}: excluded by .dockerignore"
        if os.path.isdir(full):
            for dirpath, dirnames, filenames in os.walk(full):
                reld = os.path.relpath(dirpath, context)
                dirnames[:] = [d for d in dirnames if not ignored(os.path.normpath(os.path.join(reld, d)), patterns)]
                for name in filenames:
                    relf = os.path.normpath(os.path.join(reld, name))
                    if ignored(relf, patterns):
                        continue
                    out = os.path.join(target, os.path.relpath(os.path.join(dirpath, name), full))
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copy2(os.path.join(dirpath, name), out)
        else:
            out = os.path.join(target, os.path.basename(src)) if many else target
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(full, out)
    return None


CARGO_SHIM = """#!/bin/sh
# `cargo build` of the Dockerfile, checked instead of built: the manifests and the lock
# file are resolved exactly (metadata --locked), the sources type-checked.
if [ "$1" = build ]; then
  shift
  for a in "$@"; do shift; [ "$a" = --release ] || set -- "$@" "$a"; done
  host=$(rustc -vV | sed -n 's/^host: //p')
  "{real}" metadata --locked --offline --filter-platform "$host" --format-version 1 >/dev/null || exit 1
  exec "{real}" check --offline "$@"
fi
exec "{real}" "$@"
"""


def replay_build(stage, context, target_dir, problems, log):
    _, alias, instrs = stage
    root = tempfile.mkdtemp(prefix="dockerfile-check-")
    shim = os.path.join(root, ".shim")
    os.makedirs(shim)
    real = shutil.which("cargo")
    if real is None:
        print("dockerfile check: cargo is not on PATH")
        sys.exit(2)
    with open(os.path.join(shim, "cargo"), "w") as f:
        f.write(CARGO_SHIM.replace("{real}", real))
    os.chmod(os.path.join(shim, "cargo"), 0o755)
    env = dict(os.environ, PATH=shim + os.pathsep + os.environ["PATH"], CARGO_NET_OFFLINE="true")
    if target_dir:
        env["CARGO_TARGET_DIR"] = os.path.abspath(target_dir)
    patterns = dockerignore(context)
    workdir = "/"
    try:
        for n, (kw, rest) in enumerate(instrs, 1):
            step = f"build stage `{alias}` step {n} ({kw} {rest.splitlines()[0][:60]})"
            if kw == "WORKDIR":
                workdir = rest if rest.startswith("/") else os.path.join(workdir, rest)
                os.makedirs(os.path.join(root, workdir.lstrip("/")), exist_ok=True)
            elif kw == "ENV":
                k, _, v = rest.partition("=")
                env[k.strip()] = v.strip()
            elif kw == "COPY":
                flags, sources, dest = copy_args(rest)
                if any(f.startswith("--from") for f in flags):
                    continue
                err = copy_into(context, patterns, sources, dest, root, workdir)
                if err:
                    problems.append(f"{step}: {err}")
                    return
            elif kw == "RUN":
                cwd = os.path.join(root, workdir.lstrip("/"))
                log(f"dockerfile check: {step}")
                res = subprocess.run(["sh", "-ec", rest], cwd=cwd, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-6:])
                    problems.append(f"{step} failed:\n{tail}")
                    return
    finally:
        shutil.rmtree(root, ignore_errors=True)


def apt_installs(instrs):
    pkgs = []
    for kw, rest in instrs:
        if kw != "RUN":
            continue
        for m in re.finditer(r"apt-get install([^&;|]*)", rest):
            pkgs += [w for w in m.group(1).split() if not w.startswith("-")]
    return pkgs


def installed_packages():
    """{package: (essential, priority, [dependency names])} of this machine's dpkg."""
    fmt = "${Package}\t${Essential}\t${Priority}\t${Pre-Depends}, ${Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True).stdout
    pkgs = {}
    for line in out.splitlines():
        name, essential, priority, deps = (line.split("\t") + ["", "", ""])[:4]
        names = []
        for dep in deps.split(","):
            alts = [a.strip().split(" ")[0].split(":")[0] for a in dep.split("|") if a.strip()]
            if alts:
                names.append(alts)
        pkgs[name] = (essential == "yes", priority, names)
    return pkgs


def runtime_closure(explicit, pkgs):
    """Packages of a minimal Debian image plus `explicit`, with their dependencies."""
    todo = [p for p, (ess, prio, _) in pkgs.items() if ess or prio == "required"] + ["apt"] + explicit
    have = set()
    while todo:
        p = todo.pop()
        if p in have:
            continue
        have.add(p)
        for alts in pkgs.get(p, (False, "", []))[2]:
            pick = next((a for a in alts if a in pkgs), alts[0])
            todo.append(pick)
    return have


def owner(lib):
    for path in (lib, os.path.realpath(lib)):
        res = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout.split(":")[0].strip()
        # usrmerge: /lib and /usr/lib are one directory; dpkg knows one of the names.
        alt = path[4:] if path.startswith("/usr/") else "/usr" + path
        res = subprocess.run(["dpkg", "-S", alt], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout.split(":")[0].strip()
    return None


def check_runtime(stage, build_alias, compose, bin_dir, problems):
    base, _, instrs = stage
    copied = {}
    for kw, rest in instrs:
        if kw == "COPY":
            flags, sources, dest = copy_args(rest)
            if f"--from={build_alias}" in flags:
                for s in sources:
                    copied[os.path.basename(s)] = dest
    installs = apt_installs(instrs)
    path_dirs = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin")
    entry = next((rest for kw, rest in instrs if kw == "ENTRYPOINT"), None)
    default_entry = None
    if entry:
        words = yaml.safe_load(entry) if entry.startswith("[") else entry.split()
        default_entry = words[0]

    with open(compose) as f:
        services = yaml.safe_load(f).get("services", {})
    programs = {}
    for name, s in services.items():
        if "build" not in s and not str(s.get("image", "")).startswith("payment-gateway"):
            continue
        ep = s.get("entrypoint")
        ep = ep if isinstance(ep, list) else ([ep] if ep else [])
        programs.setdefault(ep[0] if ep else default_entry, []).append(f"service `{name}` entrypoint")
        hc = (s.get("healthcheck") or {}).get("test") or []
        if isinstance(hc, str):
            hc = ["CMD-SHELL", hc]
        if hc and hc[0] in ("CMD", "CMD-SHELL"):
            cmd = hc[1].split()[0] if hc[0] == "CMD-SHELL" else hc[1]
            programs.setdefault(cmd, []).append(f"service `{name}` healthcheck")
    for prog, users in sorted(programs.items()):
        if prog in copied:
            dest = copied[prog].rstrip("/")
            if dest not in path_dirs:
                problems.append(f"runtime stage: `{prog}` is copied to {dest}, not into the PATH ({', '.join(users)})")
        elif prog not in installs:
            problems.append(
                f"runtime stage: `{prog}` ({', '.join(users)}) is neither copied from `{build_alias}` nor installed by apt-get"
            )

    pkgs = installed_packages()
    allowed = runtime_closure(installs, pkgs)
    missing_pkgs = [p for p in installs if p not in pkgs]
    if missing_pkgs:
        print(f"dockerfile check: note: {missing_pkgs} not installed here; their dependencies are not followed")
    checked = 0
    for prog in sorted(copied):
        binary = os.path.join(bin_dir, prog)
        if not os.path.exists(binary):
            problems.append(f"runtime stage: {binary} is not built (cargo build --workspace --bins)")
            continue
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+)\s+=>\s+(\S+)", line)
            if not m:
                continue
            if m.group(2) == "not":
                problems.append(f"runtime stage: {prog} needs {m.group(1)}, which this machine lacks too")
                continue
            pkg = owner(m.group(2))
            checked += 1
            if pkg is None:
                problems.append(f"runtime stage: {prog} needs {m.group(2)}, which no Debian package provides")
            elif pkg not in allowed:
                problems.append(
                    f"runtime stage: {prog} needs {m.group(1)} from package `{pkg}`, which the image `{base}` "
                    f"does not have: add it to the runtime stage's apt-get install"
                )
    return checked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dockerfile", default=os.path.join(REPO, "Dockerfile"))
    ap.add_argument("--context", default=REPO)
    ap.add_argument("--compose", default=os.path.join(REPO, "docker-compose.yml"))
    ap.add_argument("--bin-dir", default=os.path.join(REPO, "target", "debug"))
    ap.add_argument("--target-dir", default=None, help="CARGO_TARGET_DIR for the replayed build")
    ap.add_argument("--structure-only", action="store_true", help="skip the replay and the runtime stage")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    log = (lambda _m: None) if a.quiet else (lambda m: print(m, flush=True))
    problems = []

    instrs = instructions(a.dockerfile)
    st = stages(instrs)
    for base, _, _ in st:
        if ":" not in base and "@" not in base or base.endswith(":latest"):
            problems.append(f"base image `{base}` is not pinned")
    build = next((s for s in st if s[1]), None)
    if build is None or len(st) < 2:
        problems.append("expected a named build stage and a runtime stage")
        return report(problems)

    members = workspace_members(os.path.join(a.context, "Cargo.toml"))
    first_run = next((i for i, (kw, _) in enumerate(build[2]) if kw == "RUN"), len(build[2]))
    layer = build[2][:first_run]
    copied_manifests = set()
    for kw, rest in layer:
        if kw == "COPY":
            _, sources, _ = copy_args(rest)
            copied_manifests |= {s for s in sources if s.endswith("Cargo.toml")}
    stub_run = build[2][first_run][1] if first_run < len(build[2]) else ""
    for m in members:
        if f"{m}/Cargo.toml" not in copied_manifests:
            problems.append(
                f"workspace member `{m}` is not in the dependency layer: add `COPY {m}/Cargo.toml {m}/` "
                f"before the first RUN"
            )
        elif not re.search(rf"(^|\s){re.escape(m)}(\s|;|$)", stub_run):
            problems.append(f"workspace member `{m}` gets no stub src/lib.rs in the dependency layer's RUN")

    if not a.structure_only:
        replay_build(build, a.context, a.target_dir, problems, log)
        runtime = st[-1]
        checked = check_runtime(runtime, build[1], a.compose, a.bin_dir, problems)
        log(f"dockerfile check: runtime stage: {checked} shared libraries, each from a package of the image")
    return report(problems, len(members))


def report(problems, members=0):
    for p in problems:
        print(f"dockerfile check: {p}")
    print(f"dockerfile check: {members} workspace members, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
