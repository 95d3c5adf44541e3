"""The server's item-count query (`model.trained_item_rows`): settings only on the wire, the sites' counts summed,
declines, failures and silence reported, and the K most counted rows chosen."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fl_server.item_counts import choose_trained_rows
from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel

ROWS = 10  # 9 items + padding


class FakeGrid:
    """Answers each query with the reply the test built for its node; keeps what was sent."""

    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        self.sent = list(messages)
        return [answer(msg) for msg in self.sent if (answer := self.answers[msg.metadata.dst_node_id]) is not None]


NOTES = ConfigRecord({wire.WIRE_VERSION: wire.VERSION})


def counts_reply(values):
    def answer(msg):
        content = RecordDict({wire.METRICS: MetricRecord({wire.DECLINED: 0.0}), wire.NOTES: NOTES,
                              wire.ITEM_COUNTS: ArrayRecord({wire.ITEM_COUNTS: torch.tensor(values).double()})})
        return Message(content=content, reply_to=msg)
    return answer


def declined(msg):
    return Message(content=RecordDict({wire.METRICS: MetricRecord({wire.DECLINED: 1.0}),
                                       wire.NOTES: ConfigRecord({**NOTES, wire.DECLINED_REASON: "budget spent"})}),
                   reply_to=msg)


def failed(msg):
    return Message(Error(code=4001, reason="catalog mismatch"), reply_to=msg)


def model(trained_rows=2):
    return FedRecModel(FedRecConfig(num_items=ROWS - 1, hidden_size=16, max_len=10, trained_item_rows=trained_rows))


def test_the_query_carries_settings_only_and_the_summed_counts_choose_the_rows(serverapp_identity):
    grid = FakeGrid({1: counts_reply([0, 5, 0, 1, 0, 0, 0, 0, 0, 2]), 2: counts_reply([0, 0, 0, 4, 0, 0, 0, 0, 0, 2]),
                     3: declined, 4: failed, 5: None})
    global_model = model()
    summary = choose_trained_rows(grid, global_model, ConfigRecord({"lr": 0.1}), min_nodes=5, timeout=1.0)
    assert summary == {"trained_item_rows": 2, "sites_counted": 2, "sites_declined": 1, "sites_failed": 1,
                       "sites_no_reply": 1}
    assert len(grid.sent) == 5
    for msg in grid.sent:  # no weights: a histogram needs only the catalog (pinned in the settings)
        assert not msg.content.array_records and msg.metadata.message_type == f"query.{wire.COUNT_QUERY}"
        assert msg.content.config_records[wire.CONFIG][wire.SERVER_ROUND] == 0
    assert global_model.item_row_mask.nonzero().flatten().tolist() == [1, 3]  # 5 and 5 beat 4
    assert global_model.item_rows_selected


def test_nothing_is_asked_when_every_row_trains_or_the_rows_are_already_chosen():
    grid = FakeGrid({1: counts_reply([0] * ROWS)})
    assert choose_trained_rows(grid, model(trained_rows=0), ConfigRecord({}), 1, 1.0) is None
    chosen = model()
    chosen.select_most_counted_rows(torch.arange(ROWS, dtype=torch.float64))
    assert choose_trained_rows(grid, chosen, ConfigRecord({}), 1, 1.0) is None
    assert grid.sent == []


def test_a_query_no_site_answers_with_counts_stops_the_run_with_the_tally(serverapp_identity):
    with pytest.raises(RuntimeError, match=r"no site sent item counts.*'sites_declined': 1"):
        choose_trained_rows(FakeGrid({1: declined, 2: failed}), model(), ConfigRecord({}), 2, 1.0)


def test_counts_from_a_site_of_another_wire_version_are_not_summed(serverapp_identity):
    def other_version(msg):
        reply = counts_reply([0, 0, 9, 0, 0, 0, 0, 0, 9, 0])(msg)
        reply.content[wire.NOTES] = ConfigRecord({wire.WIRE_VERSION: wire.VERSION + 1})
        return reply

    grid = FakeGrid({1: counts_reply([0, 5, 0, 1, 0, 0, 0, 0, 0, 2]), 2: other_version})
    global_model = model()
    summary = choose_trained_rows(grid, global_model, ConfigRecord({}), min_nodes=2, timeout=1.0)
    assert summary["sites_counted"] == 1 and summary["sites_failed"] == 1
    assert global_model.item_row_mask.nonzero().flatten().tolist() == [1, 9]  # site 2's 9s left out
