"""What the server sends a site for one round, built by hand for the site-side tests."""

import torch

from shared_model import wire
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel


def round_record(catalog: ItemCatalog, server_round: int = 1, num_rounds: int = 2) -> tuple[dict, dict]:
    """What the server sends for a round (its ConfigRecord content) and fresh global weights."""
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=16, max_len=10,
                          catalog_fingerprint=catalog.fingerprint)
    torch.manual_seed(0)
    state = FedRecModel(config).state_dict()
    record = {wire.WIRE_VERSION: wire.VERSION,
              wire.SERVER_ROUND: server_round, wire.TRAINING_ID: "train-7", wire.NUM_ROUNDS: num_rounds,
              wire.LOCAL_EPOCHS: 1, wire.BATCH_SIZE: 32, wire.LEARNING_RATE: 0.003, wire.OPTIMIZER: "adam",
              wire.MODEL_CONFIG: config.to_json_string(), wire.CATALOG_FINGERPRINT: catalog.fingerprint}
    return record, state
