#!/usr/bin/env bash
# Distributed DP against central DP-SGD on the same protocol: the same user-level (ε, δ), sampling rate q, number
# of steps T, noise multiplier σ, clipping bound C = 1, model and learning rate (Adam on one side, FedAdam with
# τ = 1e-8 on the other). Distributed DP runs each round as one DP-SGD step over the union of the sites' users,
# under secure aggregation (docs/privacy.md); each site's ledger must then show the same ε as the central run.
# Usage: benchmarks/distributed_dp.sh beauty|movielens|synthetic OUT_DIR EPSILON [SEEDS...]   (default seed 0)
# Then:  python benchmarks/distributed_dp_table.py OUT_DIR
# RUNS=distributed runs only the distributed side (RUNS=central only the central one); both by default.
# THRESHOLD: the SecAgg+ reconstruction threshold (strategy.secagg_threshold), default 1.0. Each site adds noise
# σC/√n for the n = ⌈threshold × sites⌉ sites a sum may be unmasked over, so a round that sums all k sites carries
# σC·√(k/n): at 1.0 exactly σC, as central DP-SGD (no site may drop after key sharing); at 0.67 with 10 sites,
# 1.20 σC (three may drop). STEPS: DP steps (default per data set; the central run takes STEPS × q epochs).
# DROPOUT: the model's hidden and attention dropout on both sides (default: Beauty 0, others their presets').
# POPULARITY: σ_p of a DP release of item popularity before the first step that starts the item bias (central:
# privacy.popularity_noise, distributed: strategy.dp_popularity_noise in round 0); the steps' σ is then calibrated
# to what the release leaves of ε (default 0: no release).
# MODULUS, BITS: the secure sum's modulus and quantization (strategy.secagg_modulus_bits, default 32, and
# strategy.secagg_bits, default 16). MODULUS=16 halves the bytes a site sends; it needs sites x 2^(BITS-1) < 2^15
# (BITS=12 for 11 or 10 sites).
# NEGATIVES: a sampled softmax over that many negatives a user, drawn each step (train.num_negatives, book-keeping
# clipping) on both sides instead of the full-catalog softmax (default 0: the full catalog).
# Run from the repository root with fedrec installed; the data sets are read from ../shared/data. Meant for a GPU
# (Beauty: 60 steps of about 4,000 users each, about an hour a run on the 2-core CPU box).
set -u
DATA=${1:?data set: beauty, movielens or synthetic}
OUT=$(realpath -m "${2:?output folder}")
EPS=${3:?target epsilon}
shift 3
SEEDS=("$@")
[ ${#SEEDS[@]} -eq 0 ] && SEEDS=(0)
case $DATA in
  # the centralized DP recipe of BENCHMARKS.md (batch 4,096 of 22,363 users: 6 steps an epoch, q = 1/6,
  # 10 epochs = 60 steps, dropout 0, no event types, public attributes + feature scoring + item bias, lr 0.008);
  # federated: the fed_beauty_dp preset's 10 Dirichlet merchants and model, 60 rounds.
  beauty) USERS=22363; Q=0.16666666666666666; T=60; LR=0.008; DROP=0.0
    CENTRAL="+experiment=beauty train.batch_size=4096 model.use_event_types=false model.item_features=[attributes]
      model.feature_scoring=true model.item_bias=true"
    FEDERATED="+experiment=fed_beauty_dp" ;;
  # the centralized DP recipe with title features (batch 256 of 943 users: q = 1/4, 30 epochs = 120 steps,
  # lr 0.003); federated: fed_movielens_dp's 11 regions and model, 120 rounds, two sites at a time (about 8 min
  # a run on the idle 2-core box; one at a time, as the preset, took 80 min beside other runs).
  movielens) USERS=943; Q=0.25; T=120; LR=0.003
    CENTRAL="+experiment=movielens train.batch_size=256 model.item_features=[text]
      model.feature_scoring=true model.item_bias=true"
    FEDERATED="+experiment=fed_movielens_dp federation.num_cpus=2" ;;
  # the embedded synthetic data (2,000 users, 4 regions): batch 200, q = 1/10, 5 epochs = 50 steps (a smoke run).
  synthetic) USERS=2000; Q=0.1; T=50; LR=0.003
    CENTRAL="train.batch_size=200 model.item_features=[text] model.feature_scoring=true
      model.item_bias=true"
    FEDERATED="federation.eval_every=1000" ;;
  *) echo "unknown data set $DATA" >&2; exit 2 ;;
esac
T=${STEPS:-$T}
EPOCHS=$(python -c "t, q = $T, $Q; e = round(t * q); assert abs(e - t * q) < 1e-9, f'STEPS={t} is not whole epochs at q={q}'; print(e)") || exit 2
DROPOUT=${DROPOUT:-${DROP:-}}
THRESHOLD=${THRESHOLD:-1.0}
MODULUS=${MODULUS:-32}
NEGATIVES=${NEGATIVES:-0}
BITS=${BITS:-16}
MODEL=${DROPOUT:+"model.hidden_dropout_prob=$DROPOUT model.attention_probs_dropout_prob=$DROPOUT"}
# δ: the union's default, min(1e-5, 1 / (10 × users)), for both runs (each site is told it explicitly)
DELTA=$(python -c "print(min(1e-5, 1 / (10 * $USERS)))")
POPULARITY=${POPULARITY:-0}
# σ spending at most ε over T steps at q, after the popularity release if any (Opacus' PRV accountant, the one
# both sides account with)
SIGMA=$(python -c "from fl_client.dp.engine import calibrate_noise, PrivacyConfig
p = $POPULARITY
print(calibrate_noise(PrivacyConfig(enabled=True, epsilon=$EPS), $Q, $T, $DELTA, before=[(p, 1.0, 1)] if p else None))" \
  2>/dev/null)
mkdir -p "$OUT"
echo "ε $EPS, δ $DELTA, q $Q, T $T, σ $SIGMA, popularity release σ_p $POPULARITY, dropout ${DROPOUT:-preset}," \
  "SecAgg threshold $THRESHOLD, modulus 2^$MODULUS, $BITS bits, negatives $NEGATIVES" | tee "$OUT/plan.txt"
PRIVACY="privacy=dp privacy.epsilon=$EPS privacy.delta=$DELTA"  # the sites' budget; σ comes from the server
CENTRAL_RELEASE="privacy.popularity_noise=$POPULARITY"
FEDERATED_RELEASE="strategy.dp_popularity_noise=$POPULARITY"
RUNS=${RUNS:-central distributed}
for seed in "${SEEDS[@]}"; do
  if [[ " $RUNS " == *" central "* ]]; then
  echo "== central, seed $seed  $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086
  fedrec-centralized $CENTRAL $MODEL train.num_negatives=$NEGATIVES train.epochs=$EPOCHS $PRIVACY $CENTRAL_RELEASE privacy.noise_multiplier=$SIGMA train.lr=$LR train.patience=0 train.seed=$seed \
    hydra.run.dir="$OUT/central-$seed" > "$OUT/central-$seed.log" 2>&1
  echo "   rc=$?  $(date -u +%FT%TZ)"
  fi
  [[ " $RUNS " == *" distributed "* ]] || continue
  echo "== distributed, seed $seed  $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086
  fedrec-simulate $FEDERATED $MODEL train.num_negatives=$NEGATIVES $PRIVACY $FEDERATED_RELEASE train.seed=$seed federation.num_rounds=$T federation.eval_every=1000 \
    strategy.name=fedadam strategy.server_lr=$LR strategy.server_tau=1e-8 strategy.server_beta_2=0.999 \
    strategy.secure_aggregation=true strategy.secagg_threshold=$THRESHOLD strategy.secagg_modulus_bits=$MODULUS strategy.secagg_bits=$BITS strategy.distributed_dp=true strategy.dp_sample_rate=$Q \
    strategy.dp_noise_multiplier=$SIGMA hydra.run.dir="$OUT/distributed-$seed" > "$OUT/distributed-$seed.log" 2>&1
  echo "   rc=$?  $(date -u +%FT%TZ)"
done
