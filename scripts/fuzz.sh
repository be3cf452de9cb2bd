#!/usr/bin/env bash
# Fuzzes the API against its own OpenAPI document with schemathesis (installed from PyPI
# into target/fuzz-venv), on a local stack started for the run. Prints one line:
#   fuzz: cases=<N> server_errors=<E> schema_violations=<S>
# and fails unless E = S = 0. FUZZ_EXAMPLES sets examples per operation, FUZZ_SEED the seed
# (FUZZ_SEEDS: several runs, one per seed, summed).
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${FUZZ_EXAMPLES:-100}"
seed="${FUZZ_SEED:-1}"
venv=target/fuzz-venv
if [ ! -x "$venv/bin/st" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "fuzz: python3 -m venv failed: install the Debian package python3-venv"; exit 1; }
  "$venv/bin/pip" install --quiet "schemathesis==4.32.5" || { echo "fuzz: installing schemathesis from PyPI failed (network?)"; exit 1; }
fi
command -v curl >/dev/null || { echo "fuzz: curl not found: install the Debian package curl"; exit 1; }
cargo build --locked -q -p testkit -p payment-client --bins
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=127.0.0.1:$(port); sim=127.0.0.1:$(port); ui=127.0.0.1:$(port)
log=$(mktemp)
target/debug/local-stack --api "$api" --provider "$sim" --ui "$ui" --fast >"$log" 2>&1 &
stack=$!
trap 'kill -INT $stack 2>/dev/null; wait $stack 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do
  curl -fs "http://$api/health/ready" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "http://$api/health/ready" >/dev/null || { echo "fuzz: the local stack did not become ready"; cat "$log"; exit 1; }
# One schemathesis run per seed (FUZZ_SEEDS, space-separated); the figures are summed.
cases=0; server_errors=0; schema=0
for seed in ${FUZZ_SEEDS:-$seed}; do
  out=$(mktemp)
  set +e
  "$venv/bin/st" run "http://$api/openapi.json" -H "Authorization: Bearer sk_test_demo" \
    --checks all --max-examples "$examples" --seed "$seed" --workers 2 --no-color >"$out" 2>&1
  set -e
  # ST101/ST102: server errors; ST103-ST108: responses that break the document (status,
  # content type, headers, schema).
  read -r c e s < <(python3 - "$out" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
count = lambda codes: sum(int(n) for c, n in re.findall(r"(ST\d{3}) [^:\n]*: (\d+)", text) if c in codes)
cases = re.findall(r"(\d+) generated", text)
print(cases[-1] if cases else 0, count({"ST101", "ST102"}), count({"ST103", "ST104", "ST105", "ST106", "ST107", "ST108"}))
PY
  )
  echo "== seed $seed: cases=$c server_errors=$e schema_violations=$s"
  # What each error of schemathesis's own and each failure was (the first ones), then
  # the summary.
  sed -n '/= ERRORS =/,/Join our Discord/p' "$out" | head -n 60
  sed -n '/= FAILURES =/,/= SUMMARY =/p' "$out" | grep -v '= SUMMARY =' | head -n 150
  sed -n '/= SUMMARY =/,$p' "$out"
  rm -f "$out"
  cases=$((cases + c)); server_errors=$((server_errors + e)); schema=$((schema + s))
done
echo "fuzz: cases=$cases server_errors=$server_errors schema_violations=$schema"
[ "$cases" -gt 0 ] && [ "$server_errors" -eq 0 ] && [ "$schema" -eq 0 ]
