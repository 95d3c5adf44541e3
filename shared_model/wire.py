"""Keys of everything that crosses the wire between server and sites, defined once for both sides."""

from __future__ import annotations

# Record keys inside a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: the model's trainable state (unwrapped from Opacus' `_module.`)
CONFIG = "config"  # ConfigRecord: what the server asks for this round
METRICS = "metrics"  # MetricRecord: what a site reports back

# ConfigRecord keys (server -> site).
SERVER_ROUND = "server-round"  # set by Flower's strategies
TRAINING_ID = "training-id"  # stable across server restarts (unlike Flower's run id): keys the site's ledger
NUM_ROUNDS = "num-rounds"  # rounds the server plans in all (a site spreads its ε budget over them)
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "lr"
OPTIMIZER = "optimizer"
MODEL_CONFIG = "model-config"  # FedRecConfig as JSON: the site rebuilds the same architecture
CATALOG_FINGERPRINT = "catalog-fingerprint"  # a site refuses weights made for another catalog
PROXIMAL_MU = "proximal-mu"  # FedProx' term, set by Flower's FedProx

# MetricRecord keys (site -> server).
NUM_EXAMPLES = "num-examples"  # users trained on / evaluated (FedAvg's weighting key)
TRAIN_LOSS = "train-loss"
DECLINED = "declined"  # 1 when the site refused to train (budget); its arrays are then not aggregated
DP_ENABLED = "dp"  # 1 when the site trained with DP-SGD
EPSILON = "epsilon"  # the site's cumulative ε after this round (only meaningful when dp == 1)
DELTA = "delta"
