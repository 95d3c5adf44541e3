"""fedrec-recommend: top-k from an exported model directory, with titles, skipping unknown history items."""

import json

import pytest
import torch

from shared_model.adapters import load_dataset
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from shared_model.recommend import encode_history, main, recommend
from shared_model.sequences import make_batch, to_user_sequences
from shared_model.serialization import save_model_dir


@pytest.fixture
def model_dir(tmp_path):
    catalog = ItemCatalog.from_items([f"i{n:02d}" for n in range(20)], titles={"i05": "Red lipstick"})
    torch.manual_seed(0)
    model = FedRecModel(FedRecConfig(num_items=20, hidden_size=16, max_len=8))
    model.output.weight.data[catalog.rows(["i05"])[0]] *= 0  # a neutral score for one item
    model.item_embeddings.weight.data[catalog.rows(["i07"])[0]] = 5.0  # i07 scores very high for every history
    save_model_dir(model, catalog, tmp_path / "model")
    return tmp_path / "model", model, catalog


def test_recommend_ranks_by_score_and_excludes_the_history(model_dir):
    _, model, catalog = model_dir
    recs, unknown = recommend(model, catalog, ["i01", "i02", "nope"], k=5)
    assert unknown == ["nope"]
    assert len(recs) == 5 and [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert {"i01", "i02"}.isdisjoint(r.item_id for r in recs)
    with_seen, _ = recommend(model, catalog, ["i07"], k=20, exclude_seen=False)
    assert "i07" in {r.item_id for r in with_seen}
    assert "i07" not in {r.item_id for r in recommend(model, catalog, ["i07"], k=19)[0]}


def test_history_of_only_unknown_items_is_an_error(model_dir):
    _, model, catalog = model_dir
    with pytest.raises(ValueError, match="none of the 2 history items"):
        recommend(model, catalog, ["x", "y"])


def test_command_line_prints_json_with_titles(model_dir, capsys):
    path, _, _ = model_dir
    assert main([str(path), "i01", "i03", "--k", "19", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 18  # 20 items minus the 2 in the history
    titled = [r for r in out if r["item_id"] == "i05"]
    assert titled and titled[0]["title"] == "Red lipstick"


def test_every_user_of_an_events_file_gets_the_top_k_of_their_whole_history(model_dir, tmp_path, capsys):
    path, model, catalog = model_dir
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\n"
                      "a,i01,1700000000\na,i02,1700000100\nb,i07,1700000000\nb,nope,1700000200\nc,nope,1700000000\n")
    out = tmp_path / "recs.csv"
    assert main([str(path), "--events", str(events), "--out", str(out), "--k", "3"]) == 0
    said = capsys.readouterr().out
    assert "top 3 for 2 users (6 rows)" in said and "'unknown item': 2" in said  # c had only an unknown item
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["user_id", "rank", "item_id", "score", "title"]
    by_user = {u: [r[2] for r in rows[1:] if r[0] == u] for u in ("a", "b")}
    # each user's list is the single-history recommendation of their whole history, seen items excluded
    single = recommend(model, catalog, ["i01", "i02"], k=3, timestamps=[1700000000, 1700000100])[0]
    assert by_user["a"] == [r.item_id for r in single]
    single = recommend(model, catalog, ["i07"], k=3, timestamps=[1700000000])[0]
    assert by_user["b"] == [r.item_id for r in single] and "i07" not in by_user["b"]
    assert [r[1] for r in rows[1:4]] == ["1", "2", "3"]
    with pytest.raises(SystemExit):  # a history and --events, or --events without --out
        main([str(path), "i01", "--events", str(events), "--out", str(out)])


def test_a_single_history_reads_time_gaps_as_an_events_file_does(model_dir, tmp_path, capsys):
    """Gaps are taken between the known events (an unknown item in between is dropped first, as when fedrec
    reads a file), and the command line takes the timestamps too."""
    path, model, catalog = model_dir
    stamps = [1_700_000_000, 1_700_000_100, 1_700_100_100]  # the unknown item 100 s after i01, i02 a day later
    single, _ = encode_history(model, catalog, ["i01", "nope", "i02"], timestamps=stamps)
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\n" + "".join(
        f"d,{item},{t}\n" for item, t in zip(["i01", "nope", "i02"], stamps, strict=True)))
    seqs = to_user_sequences(load_dataset("events", events), catalog, min_events=1)
    batch = make_batch(seqs, [0], "next", model.config.max_len)
    assert torch.equal(single["time_buckets"], batch["time_buckets"]) and int(single["time_buckets"][0, 1]) > 3
    expected = recommend(model, catalog, ["i01", "nope", "i02"], k=3, timestamps=stamps)[0]
    assert main([str(path), "i01", "nope", "i02", "--timestamps", *map(str, stamps), "--k", "3", "--json"]) == 0
    assert [r["item_id"] for r in json.loads(capsys.readouterr().out)] == [r.item_id for r in expected]
    assert main([str(path), "i01", "i02", "--k", "3"]) == 0  # without times: said, not silently ignored
    assert "no --timestamps were given" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 timestamps for 3 history items"):
        encode_history(model, catalog, ["i01", "nope", "i02"], timestamps=stamps[:2])
