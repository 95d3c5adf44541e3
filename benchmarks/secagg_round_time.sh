#!/usr/bin/env bash
# What secure aggregation costs a real deployment: the locked-down loopback deployment of docs/deployment.md
# (fedrec-server: Flower's SuperLink over TLS with SuperNode authentication and the signed app; one fedrec-client
# SuperNode per site; sections 0-5), run twice with the same data, keys, model and run settings, once with
# strategy.secure-aggregation=false and once with =true (section 7), each side in its own folder with its own
# ports. DP-SGD stays on at every site (fedrec-client's default; a budget of ε = EPSILON each); the sites' data is the
# embedded synthetic generator's, split IID over the sites, made as tests/fl_server/test_lockdown.py makes it.
# Usage: benchmarks/secagg_round_time.sh OUT_DIR [ROUNDS] [SITES]      (defaults: 3 rounds, 3 sites; SecAgg needs 3+)
# Prints one table (both sides, measured in this invocation) with the machine and the date, from each side's
# metrics.jsonl (docs/configuration.md, "The round record"):
#   - seconds per round: differences of the records' `seconds` for rounds 2..ROUNDS (round 1 excluded), and
#     round 1 on its own: its `seconds` counts from the ServerApp's start, so it includes waiting for the sites,
#     their first ClientApp start-up and the frozen public tensors' first trip;
#   - bytes_to_each_site (round 1, with the frozen tensors, and later rounds) and bytes_from_each_site;
#   - secure_aggregation.protocol_bytes_max / secure_evaluation.protocol_bytes_max: per round, the largest
#     site's key, share and unmask traffic (both directions, summed over those stages: see the note printed);
#   - the final round's HR@10 and NDCG@10 (the sites' pooled evaluation; every round is evaluated) and ε max.
# The wall time of each side (fedrec-server's start to its exit) is printed too. Logs, keys and run folders stay in
# OUT_DIR: consortium/ (catalog, CA, keys, signature, the app copy both sides run), data/, off/ and on/.
# Env: USERS_PER_SITE=200 ITEMS=200 EPSILON=8 SETTINGS="<more run-config>" SIDE_TIMEOUT=1800 (s, per side).
# Timings are only comparable within one invocation (same machine, same load); on a shared or busy machine run
# it more than once. Run from anywhere with fedrec's environment active (fedrec-admin/-server/-client on PATH).
set -uo pipefail

OUT=$(realpath -m "${1:?usage: benchmarks/secagg_round_time.sh OUT_DIR [ROUNDS] [SITES]}")
ROUNDS=${2:-3}
SITES=${3:-3}
USERS_PER_SITE=${USERS_PER_SITE:-200}
ITEMS=${ITEMS:-200}
EPSILON=${EPSILON:-8}
SIDE_TIMEOUT=${SIDE_TIMEOUT:-1800}
# Small and otherwise the app's defaults (model: hidden 64, 2 blocks, title features): one local epoch of
# batches of 64 users, every round evaluated. round-timeout bounds a phase; --stall-timeout must be >= 2x it.
SETTINGS=${SETTINGS:-"local-epochs=1 batch-size=64 eval-every=1 round-timeout=300"}
STALL_TIMEOUT=900
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "error: $*" >&2; exit 1; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive whole number, got '$ROUNDS'"
[[ $SITES =~ ^[0-9]+$ ]] && [ "$SITES" -ge 3 ] || die "SITES must be at least 3 (secure aggregation), got '$SITES'"
for command in python fedrec-admin fedrec-server fedrec-client; do
  command -v "$command" > /dev/null || die "$command not found: activate fedrec's environment (. .venv/bin/activate)"
done
[ -e "$OUT/off" ] || [ -e "$OUT/on" ] && die "$OUT already holds a run (off/ or on/): give a new OUT_DIR"
mkdir -p "$OUT" || die "cannot create $OUT"

# --- every process this script starts is remembered and stopped at exit, whatever the exit -------------------
PIDS=()
PORTS=()
alive() { [ -r "/proc/$1/stat" ] && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) != Z* ]]; }
leftovers() {  # processes that name this run's folder or one of its ports (Flower's helpers fedrec starts)
  local table pattern
  table=$(ps -eo pid=,args=)
  pattern=$(sed 's/[][\\.^$*+?(){}|]/\\&/g' <<< "$OUT/")  # the folder, as a literal in the regex
  for port in "${PORTS[@]}"; do pattern+="|:$port( |\$)|--port $port( |\$)"; done
  grep -E -- "$pattern" <<< "$table" | awk -v me=$$ -v parent=$PPID '$1 != me && $1 != parent {print $1}'
}
cleanup() {
  local pid waited=0 left
  for pid in "${PIDS[@]}"; do alive "$pid" && kill -TERM "$pid" 2> /dev/null; done
  # fedrec-server answers SIGTERM by stopping its run (flwr stop), saving the ServerApp log and its SuperLink
  while [ $waited -lt 90 ]; do
    left=0; for pid in "${PIDS[@]}"; do alive "$pid" && left=1; done
    [ $left -eq 0 ] && break
    sleep 1; waited=$((waited + 1))
  done
  for pid in "${PIDS[@]}"; do alive "$pid" && { echo "warning: killing $pid (no exit after SIGTERM)" >&2; kill -KILL "$pid"; }; done
  PIDS=()
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "warning: stopping processes left behind: $(tr '\n' ' ' <<< "$left")" >&2
    kill -TERM $left 2> /dev/null; sleep 5
    left=$(leftovers); [ -n "$left" ] && kill -KILL $left 2> /dev/null
  fi
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM HUP

free_ports() {  # N distinct free loopback ports
  python -c "import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in held))" "$1"
}
ts() { date -u +%FT%TZ; }
site_name() { echo "site$1"; }

START=$(date +%s)
echo "== secagg_round_time: $ROUNDS rounds, $SITES sites, $USERS_PER_SITE users/site, $ITEMS items  $(ts)"
echo "   run config (both sides): $SETTINGS"

# --- the consortium, once for both sides (docs/deployment.md sections 0-4) -------------------------------------
C=$OUT/consortium
mkdir -p "$C/app" "$OUT/data"
# the app both sides run and the signature names (as the lockdown test does: later edits to the tree cannot
# change it between the two sides)
cp "$ROOT/pyproject.toml" "$C/app/" || die "no pyproject.toml in $ROOT"
for package in shared_model fl_client fl_server; do
  (cd "$ROOT" && tar --exclude=__pycache__ -cf - "$package") | tar -xf - -C "$C/app" || die "cannot copy $package"
done
# the consortium's items file and each site's events (tests/fl_server/test_lockdown.py, write_consortium_data)
SITES=$SITES USERS=$((USERS_PER_SITE * SITES)) ITEMS=$ITEMS DATA_DIR=$OUT/data python -c "
import os
from pathlib import Path
import pandas as pd
from simulations.config import DataConfig
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data
out, sites = Path(os.environ['DATA_DIR']), int(os.environ['SITES'])
data = prepare_data(DataConfig(name='synthetic', synthetic={'num_users': int(os.environ['USERS']),
                                                            'num_items': int(os.environ['ITEMS']), 'seed': 7}))
catalog = data.catalog
pd.DataFrame({'item_id': catalog.item_ids, 'title': [catalog.titles.get(i, '') for i in catalog.item_ids]}
             ).to_csv(out / 'products.csv', index=False)
parts = partition_users(data.sequences, PartitionConfig(kind='iid', num_partitions=sites))
frame = data.events.frame
for k, users in enumerate(parts, start=1):
    (out / f'site{k}').mkdir(parents=True, exist_ok=True)
    ids = {data.sequences.user_ids[u] for u in users}
    frame.loc[frame['user_id'].isin(ids)].to_parquet(out / f'site{k}' / 'events.parquet', index=False)
    print(f'   site{k}: {len(ids)} users')
" > "$OUT/data/make_data.log" 2>&1 || { cat "$OUT/data/make_data.log"; die "could not make the synthetic data"; }
grep '^   site' "$OUT/data/make_data.log"
admin() { fedrec-admin "$@" >> "$C/admin.log" 2>&1 || { tail -20 "$C/admin.log"; die "fedrec-admin $1 failed"; }; }
(cd "$C" && admin catalog --items "$OUT/data/products.csv" --out . \
   && admin ca --out pki && admin server-cert --ca-dir pki --out pki \
   && admin signing-key --out pki \
   && admin sign-app --key pki/consortium.key --app "$C/app" --out app.sig) || exit 1
for k in $(seq 1 "$SITES"); do  # each site's key pair, registered by the operator
  name=$(site_name "$k")
  (cd "$C" && admin site-keys --name "$name" --out "keys" \
     && admin site-add --sites sites --name "$name" --public-key "keys/$name.pub") || exit 1
done

# --- one side: a fresh server run and fresh sites (new state dirs: new ledgers) --------------------------------
run_side() {  # run_side off|on
  local side=$1 secure dir ports link k name pid server rc t0 t1 client_pids=()
  secure=$([ "$side" = on ] && echo true || echo false)
  dir=$OUT/$side
  mkdir -p "$dir/logs"
  read -r -a ports <<< "$(free_ports $((SITES + 1)))"
  link=${ports[0]}
  PORTS+=("${ports[@]}")
  echo "== secure aggregation $side: SuperLink 127.0.0.1:$link, SuperNodes on ${ports[*]:1}  $(ts)"
  t0=$(date +%s.%N)
  fedrec-server --catalog "$C/catalog.json" --out-dir "$dir/run" --num-rounds "$ROUNDS" --min-sites "$SITES" \
    --host 127.0.0.1 --port "$link" --ssl-certfile "$C/pki/server.pem" --ssl-keyfile "$C/pki/server.key" \
    --ssl-ca-certfile "$C/pki/ca.pem" --sites "$C/sites" --app-signature "$C/app.sig" --app "$C/app" \
    --stall-timeout "$STALL_TIMEOUT" --run-config "$SETTINGS strategy.secure-aggregation=$secure" \
    > "$dir/logs/server.log" 2>&1 < /dev/null &
  server=$!
  PIDS+=("$server")
  for k in $(seq 1 "$SITES"); do
    name=$(site_name "$k")
    fedrec-client --superlink "127.0.0.1:$link" --root-certificates "$C/pki/ca.pem" \
      --auth-key "$C/keys/$name.key" --trusted-publisher "$C/pki/consortium.pub" \
      --data "$OUT/data/$name/events.parquet" --catalog "$C/catalog.json" --state-dir "$dir/state/$name" \
      --epsilon "$EPSILON" --port "${ports[$k]}" --rejoin-delay 1 > "$dir/logs/$name.log" 2>&1 < /dev/null &
    pid=$!
    PIDS+=("$pid"); client_pids+=("$pid")
  done
  while alive "$server"; do  # the server exits when its run ends; a site that exits first is an error
    sleep 2
    for k in $(seq 1 "$SITES"); do
      alive "${client_pids[$((k - 1))]}" && continue
      tail -20 "$dir/logs/$(site_name "$k").log" >&2
      die "site $(site_name "$k") exited during the $side run (log: $dir/logs/$(site_name "$k").log)"
    done
    [ "$(date +%s)" -gt $((${t0%.*} + SIDE_TIMEOUT)) ] && die "the $side run took longer than SIDE_TIMEOUT=$SIDE_TIMEOUT s"
  done
  wait "$server"; rc=$?
  t1=$(date +%s.%N)
  grep -E "round [0-9]+/|done:|error|ERROR" "$dir/logs/server.log" | sed 's/^/   /' | tail -$((ROUNDS + 3))
  for pid in "${client_pids[@]}"; do kill -TERM "$pid" 2> /dev/null; done
  for pid in "${client_pids[@]}"; do wait "$pid" 2> /dev/null; done
  [ $rc -eq 0 ] || { tail -30 "$dir/logs/server.log" >&2; die "fedrec-server ended with code $rc ($side)"; }
  python -c "print(f'{$t1 - $t0:.1f}')" > "$dir/wall_seconds"
  echo "   done in $(cat "$dir/wall_seconds") s  $(ts)"
}

run_side off
run_side on
cleanup  # nothing should be left; says so if something was

# --- the table -------------------------------------------------------------------------------------------------
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
GPU=$(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
echo
echo "== machine: ${CPU:-unknown CPU}, $(nproc) cores${GPU:+, GPU $GPU}; load (uptime):$(uptime | sed 's/.*load average/ load average/')"
echo "== date: $(date -u '+%F %T UTC'); total wall time of this script: $(( $(date +%s) - START )) s"
OUT=$OUT ROUNDS=$ROUNDS SITES=$SITES python - << 'EOF'
import json, os
from statistics import mean
from pathlib import Path

out, rounds, sites = Path(os.environ["OUT"]), int(os.environ["ROUNDS"]), int(os.environ["SITES"])
rows = {side: [json.loads(line) for line in (out / side / "run" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("round", 0) >= 1] for side in ("off", "on")}
wall = {side: float((out / side / "wall_seconds").read_text()) for side in ("off", "on")}

def figures(side):
    r = rows[side]
    secs = [x["seconds"] for x in r]
    steps = [b - a for a, b in zip(secs, secs[1:])]  # rounds 2..N
    last = r[-1]
    fed = last.get("federated_eval") or {}
    return {
        "rounds recorded": len(r),
        "round 1 s (from ServerApp start)": secs[0] if secs else None,
        f"mean s/round, rounds 2-{rounds} (round 1 excluded)": sum(steps) / len(steps) if steps else None,
        f"max s/round, rounds 2-{rounds}": max(steps) if steps else None,
        "slowest site's training s (mean over rounds)": mean(train) if (train := [
            x["site_cost"]["train_seconds_max"] for x in r if "train_seconds_max" in (x.get("site_cost") or {})]) else None,
        "side's wall s (fedrec-server start to exit)": wall[side],
        "bytes to each site, round 1 (+frozen tensors)": r[0].get("bytes_to_each_site") if r else None,
        "bytes to each site, rounds 2+ (max)": max((x.get("bytes_to_each_site", 0) for x in r[1:]), default=None),
        "bytes from each site (max over rounds)": max((x.get("bytes_from_each_site", 0) for x in r), default=None),
        "SecAgg train protocol bytes/site/round (max)": max((x["secure_aggregation"].get("protocol_bytes_max", 0)
                                                             for x in r if x.get("secure_aggregation")), default=None),
        "SecAgg eval protocol bytes/site/round (max)": max((x["secure_evaluation"].get("protocol_bytes_max", 0)
                                                            for x in r if x.get("secure_evaluation")), default=None),
        f"final HR@10 (round {last.get('round')}, sites' pooled eval)": fed.get("hr@10"),
        "final NDCG@10": fed.get("ndcg@10"),
        "ε max spent at a site": (last.get("privacy") or {}).get("epsilon_max"),
    }, r

def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"

off, off_rows = figures("off")
on, on_rows = figures("on")
width = max(len(k) for k in off) + 2
print(f"\n{'secure aggregation':<{width}}{'off':>14}{'on':>14}{'on/off':>9}")
for key in off:
    a, b = off[key], on[key]
    ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
    print(f"{key:<{width}}{fmt(a):>14}{fmt(b):>14}{ratio:>9}")
problems = []
for side, r in (("off", off_rows), ("on", on_rows)):
    if len(r) != rounds:
        problems.append(f"{side}: {len(r)} of {rounds} rounds recorded")
    for x in r:
        bad = {k: x.get(k) for k in ("train_failures", "declined", "dropped", "train_no_reply") if x.get(k)}
        if x.get("train_replies") != sites or bad or x.get("unusable"):
            problems.append(f"{side} round {x['round']}: {x.get('train_replies')} replies {bad} {x.get('unusable') or ''}")
        summed = (x.get("secure_aggregation") or {}).get("sites_summed")
        if side == "on" and summed != sites:
            problems.append(f"on round {x['round']}: secure sum over {summed} sites, not {sites}")
        if side == "off" and "secure_aggregation" in x:
            problems.append(f"off round {x['round']}: has a secure_aggregation record")
print("checks: " + ("every round of both sides trained all %d sites; the 'on' side summed all of them securely"
                    % sites if not problems else "; ".join(problems)))
print("note: the SecAgg protocol bytes are metrics.jsonl's protocol_bytes_max: per round, the largest site's total of\n"
      "      the key, share and unmask exchanges (both directions), not one message; bytes to/from each site are the\n"
      "      train message and reply as sent (with SecAgg: the message with the sealed shares, the masked update).")
EOF
