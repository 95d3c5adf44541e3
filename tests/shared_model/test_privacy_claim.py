"""The one privacy claim: unit, (ε, δ) and mechanism, "≤" for maxima over parties, and no claim without DP."""

from shared_model.privacy_claim import privacy_claim


def test_a_claim_names_the_unit_epsilon_delta_and_mechanism():
    assert privacy_claim(8.0, 1e-5, mechanism="over 60 DP-SGD steps (σ = 1.118, C = 1)") == \
        "(ε = 8.000, δ = 1e-05)-DP per user, over 60 DP-SGD steps (σ = 1.118, C = 1)"
    assert privacy_claim(3.0, 0.01, unit="user of a site", upper_bound=True, note="Each site enforces its budget.") \
        == "(ε ≤ 3.000, δ ≤ 0.01)-DP per user of a site. Each site enforces its budget."


def test_without_dp_there_is_no_claim_and_it_says_why():
    assert privacy_claim(None) == "no differential privacy (DP was off)"
    assert privacy_claim(2.0, None) == "no differential privacy (DP was off)"  # an ε without δ is no claim
    assert privacy_claim(None, no_dp_reason="DP off at some site") == "no differential privacy (DP off at some site)"
