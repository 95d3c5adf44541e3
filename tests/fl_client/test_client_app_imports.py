"""In deployment Flower starts a fresh ClientApp process for every message, and six of a secure round's eight
messages are secure-aggregation stages (keys, shares, unmask; for the training and for the evaluation sum).
Those stages must not pay for importing torch, transformers, Opacus and pandas (about 3-5 s a process on the 2-core
box, against about 0.6 s without them)."""

import json
import subprocess
import sys
import textwrap

from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig, load_site_data
from shared_model.catalog import ItemCatalog
from simulations.synthetic import generate_events, write_events

STAGES = textwrap.dedent("""
    import json, sys
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from fl_client import secagg
    from fl_client.client_app import SECAGG_STATE, build_client_app, secagg_state
    from fl_client.dp.settings import PrivacyConfig
    from fl_client.site import SiteConfig
    from shared_model import secure_sum, wire
    from flwr.supercore.task_identity import TaskIdentity
    from shared_model.secure_sum import SecureSumSettings

    for attribute in ("_run_id", "_node_id", "_task_id"):  # as inside a running ServerApp, to build its messages
        setattr(TaskIdentity, attribute, 1)
    folder = sys.argv[1]
    nodes = [1, 2, 3]
    sites = {n: SiteConfig(data_path=f"{folder}/events.csv", catalog_path=f"{folder}/catalog.json",
                           state_dir=f"{folder}/state{n}", privacy=PrivacyConfig(enabled=False)) for n in nodes}
    app = build_client_app(lambda context: sites[context.node_id])
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    settings = SecureSumSettings()
    tag = secure_sum.round_tag("t1", 1)
    common = {"tag": tag, **settings.to_record()}

    def ask(action, records):
        answers = {}
        for n, record in records.items():
            msg = Message(content=RecordDict({wire.SECAGG: ConfigRecord(record)}), dst_node_id=n,
                          message_type=f"{MessageType.QUERY}.{action}")
            reply = app(msg, contexts[n])
            assert not reply.has_error(), reply.error.reason
            answers[n] = dict(reply.content.config_records[wire.SECAGG])
        return answers

    keys = ask(wire.SECAGG_KEYS_QUERY, {n: common for n in nodes})
    roster = {"roster": nodes, "roster-enc": [keys[n]["enc-key"] for n in nodes],
              "roster-mask": [keys[n]["mask-key"] for n in nodes]}
    shares = ask(wire.SECAGG_SHARES_QUERY, {n: {**common, **roster} for n in nodes})
    for n in nodes:  # stage 3 without a model: open the shares sealed for n and mask a vector
        inbox = {src: bytes(blob) for src in nodes if src != n
                 for dst, blob in zip(shares[src]["destinations"], shares[src]["sealed"]) if int(dst) == n}
        state = secagg_state(contexts[n])
        secagg.open_shares(state, tag, inbox)
        secagg.add_masks(state, np.zeros(4, dtype=np.uint32), settings)
        contexts[n].state[SECAGG_STATE] = ConfigRecord(state.to_record())
    unmask = ask(wire.SECAGG_UNMASK_QUERY, {n: {**common, "survivors": nodes, "dropped": []} for n in nodes})
    print(json.dumps({"users": [keys[n]["users"] for n in nodes], "unmask": [len(unmask[n]["shares"]) for n in nodes],
                      "heavy": sorted(m for m in ("torch", "transformers", "opacus", "pandas") if m in sys.modules)}))
""")


def test_secure_aggregation_stages_run_without_importing_torch_transformers_opacus_or_pandas(tmp_path):
    log = generate_events(num_users=40, num_items=20, seed=3)
    write_events(log, tmp_path / "events.csv")
    ItemCatalog.from_events(log.frame).save(tmp_path)
    for n in (1, 2, 3):  # what each site's fedrec-client does before its SuperNode starts: parse, cache
        load_site_data(SiteConfig(data_path=str(tmp_path / "events.csv"), catalog_path=str(tmp_path / "catalog.json"),
                                  state_dir=str(tmp_path / f"state{n}"), privacy=PrivacyConfig(enabled=False)))
    out = subprocess.run([sys.executable, "-c", STAGES, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert all(users > 0 for users in result["users"])
    assert result["unmask"] == [3, 3, 3]  # a seed share of each survivor, itself included


def test_train_and_evaluate_messages_import_no_transformers():
    """A train or evaluate message's process imports torch and (train) Opacus, never transformers' modelling code:
    about 2.4 s of CPU a message on the 2-core box (BENCHMARKS.md). The text encoder is the server's."""
    code = ("import sys, fl_client.client_app, fl_client.training_round, fl_client.evaluation, fl_client.distributed_dp"
            "; print(sorted(m for m in ('torch', 'opacus', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["['opacus',", "'torch']"]
