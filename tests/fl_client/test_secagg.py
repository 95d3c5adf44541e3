"""A site's side of secure aggregation against a server that breaks the protocol: each attempt to learn one
site's update, or to make it spend ε for nothing, is refused."""

import numpy as np
import pytest
from scipy import stats

from fl_client import secagg
from shared_model import secure_sum
from shared_model.secure_sum import SecureSumError, SecureSumSettings

TAG = secure_sum.round_tag("train-1", 3)
SETTINGS = SecureSumSettings()


def three_sites(settings: SecureSumSettings = SETTINGS) -> dict[int, secagg.SecAggState]:
    """Sites 1, 2, 3 through stages 1-3 (keys, shares, shares opened)."""
    states, roster = {}, {}
    for node in (1, 2, 3):
        states[node], roster[node] = secagg.make_keys(TAG, node)
    sealed = {node: secagg.make_shares(state, TAG, dict(roster), settings) for node, state in states.items()}
    for node, state in states.items():
        secagg.open_shares(state, TAG, {src: out[node] for src, out in sealed.items() if node in out})
    return states


def masked(state: secagg.SecAggState, update: np.ndarray, weight: int = 5) -> np.ndarray:
    return secagg.mask_update(state, update, weight, 10, SETTINGS, np.random.default_rng(0))[0]


def test_a_state_survives_the_context_record_round_trip():
    state = three_sites()[2]
    again = secagg.SecAggState.from_record(state.to_record())
    assert again == state


def test_unmask_refuses_a_site_named_both_survivor_and_dropped_and_answers_only_once():
    states = three_sites()
    for state in states.values():
        masked(state, np.zeros(4))
    with pytest.raises(SecureSumError, match="both survivor and dropped"):
        secagg.unmask_shares(states[1], TAG, [1, 2, 3], [2])  # seed and key of 2: its update alone
    shares = secagg.unmask_shares(states[1], TAG, [1, 2, 3], [])
    assert sorted(shares) == [1, 2, 3]
    with pytest.raises(SecureSumError, match="stage 4 asked after stage 4"):
        secagg.unmask_shares(states[1], TAG, [1, 3], [2])  # a second request, now for 2's mask key


def test_unmask_refuses_too_few_survivors_to_hide_one_update():
    states = three_sites()
    masked(states[1], np.zeros(4))
    with pytest.raises(SecureSumError, match="survivors around this site"):
        secagg.unmask_shares(states[1], TAG, [1], [2, 3])


def test_stages_out_of_order_or_for_another_round_are_refused():
    state, public = secagg.make_keys(TAG, 1)
    with pytest.raises(SecureSumError, match="stage 3 asked after stage 1"):
        secagg.open_shares(state, TAG, {})
    other_round = secure_sum.round_tag("train-1", 4)
    with pytest.raises(SecureSumError, match="another round"):
        secagg.make_shares(state, other_round, {1: public, 2: secure_sum.new_key_pair()[::-1]}, SETTINGS)


def test_a_roster_without_this_sites_keys_or_repeating_a_key_is_refused():
    state, public = secagg.make_keys(TAG, 1)
    _, other = secagg.make_keys(TAG, 2)
    with pytest.raises(SecureSumError, match="own public keys"):
        secagg.make_shares(state, TAG, {1: other, 2: public}, SETTINGS)
    with pytest.raises(SecureSumError, match="repeats a public key"):
        secagg.make_shares(state, TAG, {1: public, 2: public}, SETTINGS)


def test_an_altered_or_misaddressed_share_is_refused():
    states, roster = {}, {}
    for node in (1, 2, 3):
        states[node], roster[node] = secagg.make_keys(TAG, node)
    sealed = {node: secagg.make_shares(state, TAG, dict(roster), SETTINGS) for node, state in states.items()}
    altered = bytearray(sealed[2][1])
    altered[-1] ^= 1
    with pytest.raises(SecureSumError, match="failed authentication"):
        secagg.open_shares(states[1], TAG, {2: bytes(altered), 3: sealed[3][1]})
    with pytest.raises(SecureSumError, match="failed authentication"):  # 3's share for 2, handed to 1
        secagg.open_shares(three_sites()[1], TAG, {2: sealed[3][2]})


def test_too_few_neighbours_left_after_sharing_is_refused_before_training():
    states, roster = {}, {}
    for node in (1, 2, 3, 4):
        states[node], roster[node] = secagg.make_keys(TAG, node)
    sealed = {node: secagg.make_shares(state, TAG, dict(roster), SETTINGS) for node, state in states.items()}
    with pytest.raises(SecureSumError, match="too few sites left"):
        secagg.open_shares(states[1], TAG, {2: sealed[2][1]})  # 3 and 4 dropped: 2 of the 4 holders, 3 needed


def test_the_masked_vector_is_uniform_and_independent_of_the_update():
    """What the server receives from one site looks the same whatever the update: uniform integers, no
    correlation with the update (a zero update and a large one give indistinguishable vectors)."""
    rng = np.random.default_rng(1)
    size = 20_000
    large = rng.normal(0, 0.1, size)
    for update in (np.zeros(size), large):
        vector = masked(three_sites()[1], update)[:size].astype(np.float64) / 2 ** 32
        assert stats.kstest(vector, "uniform").pvalue > 1e-3
        assert abs(np.corrcoef(vector, large)[0, 1]) < 5 / np.sqrt(size)
    zeros, big = (masked(three_sites()[1], u)[:size].astype(np.float64) for u in (np.zeros(size), large))
    assert stats.ks_2samp(zeros, big).pvalue > 1e-3


def test_a_round_is_released_once(tmp_path):
    assert not secagg.released(tmp_path, TAG)
    secagg.mark_released(tmp_path, TAG)
    assert secagg.released(tmp_path, TAG)
    assert not secagg.released(tmp_path, secure_sum.round_tag("train-1", 4))
