"""The typed round record: a field that does not apply is not written; an empty result is."""

from fl_server.round_record import RoundRecord, undocumented


def test_a_record_writes_the_fields_that_apply_in_declared_order():
    record = RoundRecord(round=3, seconds=1.5, train_replies=2, dropped=0, central_eval={}, lr=0.001)
    assert record.row() == {"round": 3, "seconds": 1.5, "lr": 0.001, "train_replies": 2, "dropped": 0,
                            "central_eval": {}}  # 0 and {} are results; None means "does not apply"
    assert undocumented(record.row()) == [] and undocumented({**record.row(), "extra": 1}) == ["extra"]
