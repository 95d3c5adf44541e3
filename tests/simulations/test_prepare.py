"""What every entry point loads: a user sample keeps the whole catalog, so models trained on it fit full runs."""

import pytest

from simulations.config import DataConfig
from simulations.prepare import prepare_data

SYNTHETIC = {"num_users": 200, "num_items": 40, "seed": 3}


def test_a_user_share_keeps_a_seeded_sample_of_users_and_their_events_and_the_whole_catalog():
    full = prepare_data(DataConfig(name="synthetic", synthetic=SYNTHETIC))
    sample = prepare_data(DataConfig(name="synthetic", synthetic=SYNTHETIC, user_share=0.25))
    again = prepare_data(DataConfig(name="synthetic", synthetic=SYNTHETIC, user_share=0.25))
    other = prepare_data(DataConfig(name="synthetic", synthetic=SYNTHETIC, user_share=0.25, user_share_seed=1))
    assert len(sample.sequences) == round(0.25 * len(full.sequences))
    assert sample.sequences.user_ids == again.sequences.user_ids != other.sequences.user_ids
    assert sample.catalog.fingerprint == full.catalog.fingerprint  # every item row still means the same item
    kept = set(sample.sequences.user_ids)
    assert set(sample.events.frame["user_id"]) == kept
    assert len(sample.events.frame) == int(full.events.frame["user_id"].isin(kept).sum())
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"data.user_share must be in \\(0, 1\\], got {share}"):
            prepare_data(DataConfig(name="synthetic", synthetic=SYNTHETIC, user_share=share))
