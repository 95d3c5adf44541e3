"""The arithmetic and cryptography of secure summation."""

import itertools
import os

import numpy as np
import pytest

from shared_model import secure_sum
from shared_model.secure_sum import SecureSumError, SecureSumSettings


def test_any_threshold_of_shares_rebuilds_a_secret_and_fewer_do_not():
    secret = os.urandom(32)
    shares = secure_sum.split_secret(secret, 3, 5)
    for picked in itertools.combinations(shares, 3):
        assert secure_sum.combine_secret(list(picked), 3) == secret
    with pytest.raises(SecureSumError, match="2 usable shares, 3 needed"):
        secure_sum.combine_secret([*shares[:2], shares[0], b"short"], 3)  # a repeat and a malformed one do not count


def test_quantization_is_unbiased_within_one_step_and_counts_what_it_clips():
    settings = SecureSumSettings(clip=0.5, bits=16)
    rng = np.random.default_rng(0)
    update = rng.uniform(-0.4, 0.4, 50_000)
    levels, clipped = secure_sum.encode(update, 1.0, settings, rng)
    back = secure_sum.decode(levels, settings)
    assert clipped == 0 and np.abs(back - update).max() <= settings.step
    assert abs((back - update).mean()) < settings.step / 50  # stochastic rounding: no drift
    _, clipped = secure_sum.encode(np.array([0.6, -0.7, 0.1]), 1.0, settings, rng)
    assert clipped == 2


def test_signed_sums_survive_the_modular_wrap_around():
    settings = SecureSumSettings(bits=8, modulus_bits=32)
    rng = np.random.default_rng(1)
    parts = [rng.uniform(-0.5, 0.5, 100) for _ in range(7)]
    encoded = [secure_sum.encode(p, 1.0, settings, rng)[0] for p in parts]
    total = np.sum(np.stack(encoded), axis=0, dtype=np.uint32)
    assert np.abs(secure_sum.decode(total, settings) - np.sum(parts, axis=0)).max() <= 7 * settings.step


def test_a_16_bit_sum_adds_levels_and_counts_past_65536_exactly():
    # 15 sites at 11 bits fill the signed 16-bit range (15 x 2^10 < 2^15); their weights and clipped counts sum
    # far past 2^16 and still come back exact, as digits of 11 bits.
    settings = SecureSumSettings(clip=0.5, bits=11, modulus_bits=16)
    settings.check(15)
    rng = np.random.default_rng(2)
    parts = [rng.uniform(-0.5, 0.5, 300) for _ in range(15)]
    counts = [(40_000 + 1_000 * i, 2 ** 40 + i) for i in range(15)]  # weights, clipped counts
    vectors = [np.concatenate([secure_sum.encode(p, 1.0, settings, rng)[0],
                               secure_sum.encode_counts(list(c), settings)])
               for p, c in zip(parts, counts, strict=True)]
    masks = [secure_sum.mask(os.urandom(32), len(vectors[0]), settings) for _ in vectors]
    sent = [v + m for v, m in zip(vectors, masks, strict=True)]
    assert all(v.dtype == np.uint16 for v in sent)  # 2 bytes a value on the wire
    total = np.sum(np.stack(sent), axis=0, dtype=np.uint16) - np.sum(np.stack(masks), axis=0, dtype=np.uint16)
    tail = 2 * settings.count_digits
    assert np.abs(secure_sum.decode(total[:-tail], settings) - np.sum(parts, axis=0)).max() <= 15 * settings.step
    weight, clipped = secure_sum.decode_counts(total[-tail:], 15, settings)
    assert (weight, clipped) == (sum(c[0] for c in counts), sum(c[1] for c in counts))
    bad = secure_sum.encode_counts([5, 7], settings)
    bad[1] = 2 ** 10  # one site's digit past its 10 bits: a weight that honest sites could not send
    with pytest.raises(SecureSumError, match="outside what honest sites can send"):
        secure_sum.decode_counts(bad, 1, settings)
    with pytest.raises(SecureSumError, match="must lie in"):
        secure_sum.encode_counts([-1, 0], settings)


def test_pairwise_masks_cancel_in_the_sum():
    settings = SecureSumSettings()
    keys = {n: secure_sum.new_key_pair() for n in (3, 8, 20)}
    tag = secure_sum.round_tag("t", 1)
    total = np.zeros(1000, dtype=np.uint32)
    for me, (private, _) in keys.items():
        for other, (_, public) in keys.items():
            if other != me:
                pair = secure_sum.pair_mask(private, public, tag, me, other, 1000, settings)
                total = total + pair if secure_sum.pair_sign(me, other) > 0 else total - pair
    assert not total.any()
    a, b = keys[3], keys[8]
    other_round = secure_sum.round_tag("t", 2)
    assert not np.array_equal(secure_sum.pair_mask(a[0], b[1], tag, 3, 8, 10, settings),
                              secure_sum.pair_mask(a[0], b[1], other_round, 3, 8, 10, settings))


@pytest.mark.parametrize(("changes", "problem"), [
    ({"modulus_bits": 48}, "use 16, 32 or 64"), ({"clip": 0.0}, "positive"), ({"clip": float("nan")}, "positive"),
    ({"bits": 31}, "must be 2..30"), ({"threshold": 0.5}, "majority"), ({"neighbours": 3}, "even"),
])
def test_unsafe_settings_are_refused_naming_the_setting(changes, problem):
    with pytest.raises(SecureSumError, match=problem):
        SecureSumSettings(**changes).check(10)


def test_a_sum_that_could_overflow_the_modulus_is_refused():
    SecureSumSettings(bits=16, modulus_bits=32).check(65_535)
    with pytest.raises(SecureSumError, match="overflows"):
        SecureSumSettings(bits=16, modulus_bits=32).check(65_536)
    SecureSumSettings(bits=16, modulus_bits=64).check(65_536)
    SecureSumSettings(bits=12, modulus_bits=16).check(15)  # 15 x 2^11 < 2^15
    with pytest.raises(SecureSumError, match="overflows a sum mod 2\\^16"):
        SecureSumSettings(bits=12, modulus_bits=16).check(16)


def test_settings_round_trip_through_a_record_and_a_broken_record_is_named():
    settings = SecureSumSettings(clip=0.25, bits=12, modulus_bits=64, threshold=0.8, neighbours=4)
    assert SecureSumSettings.from_record(settings.to_record()) == settings
    with pytest.raises(SecureSumError, match="'bits'"):
        SecureSumSettings.from_record({k: v for k, v in settings.to_record().items() if k != "bits"})
    with pytest.raises(SecureSumError, match=r"secagg.bits=1: must be 2..62"):  # a rogue server's record
        SecureSumSettings.from_record({**settings.to_record(), "bits": 1})


@pytest.mark.parametrize("degree", [0, 2, 4, 6])
def test_neighbourhoods_are_symmetric_with_the_asked_degree(degree):
    nodes = list(range(100, 120))
    graph = secure_sum.neighbourhoods(nodes, degree, b"seed")
    for node, around in graph.items():
        assert node not in around and len(around) == (degree or len(nodes) - 1)
        assert all(node in graph[other] for other in around)
    assert secure_sum.neighbourhoods(nodes, degree, b"seed") == graph  # both sides derive the same graph


def test_a_sealed_share_opens_only_with_its_key_and_context():
    key = os.urandom(32)
    sealed = secure_sum.seal(key, b"share", b"ctx")
    assert secure_sum.unseal(key, sealed, b"ctx") == b"share"
    for bad_key, context, blob in ((os.urandom(32), b"ctx", sealed), (key, b"other", sealed), (key, b"ctx", b"x")):
        with pytest.raises(SecureSumError, match="failed authentication"):
            secure_sum.unseal(bad_key, blob, context)
    with pytest.raises(SecureSumError, match="bad public key"):
        secure_sum.agree(secure_sum.new_key_pair()[0], bytes(32), b"ctx")  # the all-zero point


def test_evaluation_sums_pool_per_user_means_and_refuse_what_cannot_be_summed():
    sites = [([0.25, 0.0625, 3.5], 40), ([0.5, 0.3, 2.0], 10), ([0.0, 0.0, 9.25], 1)]
    total = sum(secure_sum.encode_sums(means, users) for means, users in sites)
    means, users = secure_sum.decode_sums(total, len(sites))
    assert users == 51
    expected = [sum(m[i] * u for m, u in sites) / 51 for i in range(3)]
    assert means == pytest.approx(expected, abs=2.0 ** -16)
    for bad in ([float("nan")], [-0.1], [float("inf")], [2.0 ** 40]):
        with pytest.raises(SecureSumError, match="cannot be summed securely"):
            secure_sum.encode_sums(bad, 10)
    with pytest.raises(SecureSumError, match="out of range"):  # more than two honest sites could send
        secure_sum.decode_sums(np.array([2 * secure_sum.SUM_LIMIT, 3], dtype=np.uint64), 2)


def unmaskable(survivors: set[int], graph: dict[int, list[int]], needed: int) -> bool:
    """Whether a server following the protocol can unmask the sum of `survivors`: each survivor's private mask
    from `needed` shares held by survivors of its closed neighbourhood, and each dropped site next to a survivor
    its pairwise key from `needed` shares held by survivors among its neighbours (it answers nothing itself)."""
    for node, neighbours in graph.items():
        holders = len(survivors & {node, *neighbours})
        if node in survivors and holders < needed:
            return False
        if node not in survivors and survivors & set(neighbours) and holders < needed:
            return False
    return True


@pytest.mark.parametrize("sites,degree", [(7, 0), (9, 2), (10, 2), (11, 4), (12, 4), (13, 6)])
@pytest.mark.parametrize("threshold", [0.51, 0.67, 0.8, 1.0])
def test_fewest_unmasked_never_exceeds_the_smallest_sum_a_server_can_unmask(sites, degree, threshold):
    """Distributed DP calibrates each site's noise share to the fewest sites in an unmasked sum: the bound must
    hold for every set of survivors (all of them, by brute force), on the complete graph and on rings."""
    graph = secure_sum.neighbourhoods(list(range(sites)), degree, b"tag")
    neighbourhood = len(graph[0]) + 1
    needed = SecureSumSettings(threshold=threshold).shares_needed(neighbourhood)
    smallest = min(size for size in range(1, sites + 1) for group in itertools.combinations(range(sites), size)
                   if unmaskable(set(group), graph, needed))
    bound = secure_sum.fewest_unmasked(sites, neighbourhood, needed)
    assert bound == smallest  # safe (never above) and tight (on these graphs, exactly the smallest)
    if degree == 0:  # the complete graph: the shares needed
        assert bound == needed
    else:  # a ring: above one neighbourhood's threshold, which a ring's sum can never be unmasked over
        assert bound > needed
