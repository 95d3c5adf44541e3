"""Misbehaving simulated sites: which sites attack, and what their replies carry instead of the honest update."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from shared_model import wire
from simulations.attacks import AttackConfig, attack_mod, attacked_update, attackers

START = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32), "b": np.array([[0.5]], dtype=np.float32)}
HONEST = {"w": np.array([1.5, 2.0, 2.0], dtype=np.float32), "b": np.array([[1.0]], dtype=np.float32)}


@pytest.fixture(autouse=True)
def app_identity(monkeypatch):
    """The run/node/task ids a running app has, so Messages can be built outside one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def train_message() -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in START.items()})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def context(site: int) -> Context:
    return Context(run_id=1, node_id=site + 10, node_config={"partition-id": site}, state=RecordDict(),
                   run_config={})


def honest_site(msg: Message, _context: Context) -> Message:
    reply = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v.copy()) for k, v in HONEST.items()}),
                        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10.0, wire.DECLINED: 0.0})})
    return Message(content=reply, reply_to=msg)


def sent_update(reply: Message) -> dict[str, np.ndarray]:
    arrays = reply.content.array_records[wire.ARRAYS]
    return {k: arrays[k].numpy() - START[k] for k in START}


def test_attackers_are_a_seeded_choice_and_their_number_is_checked():
    config = AttackConfig(kind="scale", num_sites=2, seed=3)
    assert attackers(config, 10) == attackers(config, 10) and len(set(attackers(config, 10))) == 2
    with pytest.raises(ValueError, match="only 1 site"):
        attackers(config, 1)
    with pytest.raises(ValueError, match="needs num_sites > 0"):
        AttackConfig(kind="scale", num_sites=0)
    assert AttackConfig(kind="none", num_sites=2).kind == "none"  # a sweep's clean run may keep num_sites
    with pytest.raises(ValueError, match="sign_flip"):
        AttackConfig(kind="backdoor", num_sites=1)


@pytest.mark.parametrize("kind,expected", [("sign_flip", {"w": [-0.5, 0.0, 1.0], "b": [[-0.5]]}),
                                           ("scale", {"w": [5.0, 0.0, -10.0], "b": [[5.0]]})])
def test_a_bad_site_sends_the_attacked_update_and_a_good_site_its_own(kind, expected):
    mod = attack_mod(AttackConfig(kind=kind, num_sites=1), bad_sites=[0])
    bad = mod(train_message(), context(0), honest_site)
    for name, values in expected.items():
        np.testing.assert_allclose(sent_update(bad)[name], values, rtol=1e-6)
        assert bad.content.array_records[wire.ARRAYS][name].dtype == "float32"
    good = mod(train_message(), context(1), honest_site)
    np.testing.assert_allclose(sent_update(good)["w"], HONEST["w"] - START["w"])


def test_noise_has_the_asked_norm_and_no_relation_to_the_update():
    rng = np.random.default_rng(0)
    update = np.ones(10_000)
    noise = attacked_update("noise", update, 10.0, rng)
    assert np.linalg.norm(noise) == pytest.approx(10.0 * np.linalg.norm(update))
    assert abs(np.corrcoef(noise, rng.standard_normal(10_000) + update)[0, 1]) < 0.05


def test_evaluate_messages_and_declined_rounds_are_left_alone():
    mod = attack_mod(AttackConfig(kind="scale", num_sites=1), bad_sites=[0])
    evaluate = Message(content=train_message().content, dst_node_id=1, message_type=MessageType.EVALUATE)
    assert mod(evaluate, context(0), honest_site).content.array_records[wire.ARRAYS]["w"].numpy()[0] == 1.5

    def declining(msg: Message, ctx: Context) -> Message:
        reply = honest_site(msg, ctx)
        reply.content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 0.0, wire.DECLINED: 1.0})
        return reply

    assert mod(train_message(), context(0), declining).content.array_records[wire.ARRAYS]["w"].numpy()[0] == 1.5
