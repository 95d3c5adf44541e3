"""The configuration reference (docs/configuration.md), generated from the typed dataclasses, the app's run
config and the command-line parsers, so it cannot drift from the code (a test compares the file with this).

python -m simulations.config_reference > docs/configuration.md

Each dataclass field documents itself with a trailing `# (type) meaning` comment (or comment lines just above it,
for a long one); a field without one is an error here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_client.dp.settings import PrivacyConfig
from fl_client.site import NODE_PRIVACY_KEYS, SiteConfig
from fl_client.supernode import build_parser as client_parser
from fl_client.train import TrainConfig
from fl_server.config import ServerConfig, StrategyConfig
from fl_server.deploy import app_defaults
from fl_server.deploy import build_parser as server_parser
from fl_server.round_record import RoundRecord
from shared_model.factory import ModelConfig
from simulations.attacks import AttackConfig
from simulations.audit import AuditConfig
from simulations.config import DataConfig, EvalConfig
from simulations.partition import PartitionConfig
from simulations.simulate import FederationConfig

PROJECT = Path(__file__).resolve().parents[1]
# The Hydra groups of fedrec-simulate / fedrec-centralized / fedrec-audit, in the order a run reads them.
HYDRA_GROUPS: tuple[tuple[str, type, str], ...] = (
    ("data", DataConfig, "all three commands"),
    ("model", ModelConfig, "all three commands"),
    ("train", TrainConfig, "all three commands"),
    ("privacy", PrivacyConfig, "all three commands"),
    ("eval", EvalConfig, "fedrec-centralized"),
    ("partition", PartitionConfig, "fedrec-simulate, fedrec-audit"),
    ("federation", FederationConfig, "fedrec-simulate, fedrec-audit"),
    ("strategy", StrategyConfig, "fedrec-simulate, fedrec-audit"),
    ("attack", AttackConfig, "fedrec-simulate"),
    ("audit", AuditConfig, "fedrec-audit"),
)


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment, without the leading "(type)"} for the fields a dataclass declares itself."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    fields = [(node.target.id, node.lineno, node.end_lineno or node.lineno) for node in body.body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    own = {name: next((comments[n] for n in range(first, last + 1) if n in comments), "")
           for name, first, last in fields}
    # Comment-only lines between two fields belong to the next field when it has no comment of its own (a long
    # meaning written above it), else they continue the previous field's.
    previous: str | None = None
    start = 1
    for name, first, last in fields:
        block = " ".join(comments[n] for n in range(start, first) if n in comments)
        if block and not own[name]:
            own[name] = block
        elif block and previous is not None:
            own[previous] += " " + block
        previous, start = name, last + 1
    return {name: text[text.index(")") + 1:].strip() if text.startswith("(") and ")" in text else text
            for name, text in own.items()}


def describe(cls: type) -> dict[str, str]:
    """Every field's meaning, through the class hierarchy; ValueError for a field without one."""
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            meanings.update(field_comments(klass))
    missing = [f.name for f in plain_fields(cls) if not meanings.get(f.name)]
    if missing:
        raise ValueError(f"{cls.__name__}: fields {missing} have no `# (type) meaning` comment")
    return meanings


def default_of(f: dataclasses.Field) -> Any:
    """A field's default (its factory's value), or MISSING when it is required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def shown(value: Any) -> str:
    """A default as a user writes it (YAML / TOML style)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows), ""]


def plain_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are settings, not nested groups (a dataclass default)."""
    return [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(default_of(f))]


def hydra_section() -> list[str]:
    lines = ["## Simulation, centralized training and audit (Hydra)", "",
             "`fedrec-simulate`, `fedrec-centralized` and `fedrec-audit` take `group.setting=value` overrides "
             "(e.g. `privacy.epsilon=3 federation.num_rounds=20`) on top of a preset (`+experiment=fed_beauty_dp`; "
             "presets are in `simulations/conf/experiment/`). The top-level `output_dir` is where a run writes.", ""]
    for group, cls, used_by in HYDRA_GROUPS:
        meaning = describe(cls)
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        lines += [f"### `{group}` ({used_by})", "", doc, ""]
        lines += table([(f"`{group}.{f.name}`", shown(default_of(f)), meaning[f.name]) for f in plain_fields(cls)],
                       ("setting", "default", "meaning"))
    return lines


def run_config_section() -> list[str]:
    """The Flower run config of fedrec-server / `flwr run`: pyproject's keys, each the kebab case of a field."""
    sections = {"": ServerConfig, "model.": ModelConfig, "strategy.": StrategyConfig}
    rows = []
    for key, value in app_defaults(PROJECT).items():
        prefix = key[:key.index(".") + 1] if "." in key else ""
        cls = sections.get(prefix)
        name = key[len(prefix):].replace("-", "_")
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"pyproject.toml [tool.flwr.app.config] key {key!r} names no setting")
        rows.append((f"`{key}`", shown(value), describe(cls)[name]))
    return ["## The server's run config (`fedrec-server --run-config`, `flwr run`)", "",
            "Settings of a deployed federation travel as Flower's run config: `fedrec-server --run-config "
            "\"num-rounds=20 model.hidden-size=32\"` (or `flwr run . --run-config ...`). The defaults below are "
            "`[tool.flwr.app.config]` in pyproject.toml, the same as the simulation's (checked by a test). Two "
            "keys have no default and fedrec-server sets them: `out-dir` and `catalog-path` (absolute paths).", "",
            *table(rows, ("key", "default", "meaning"))]


def flags_section(title: str, intro: str, parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = "(required)" if action.required else ("false" if action.const is True and not action.default
                                                        else "fedrec's source tree" if action.default == str(PROJECT)
                                                        else shown(action.default))
        rows.append((f"`{action.option_strings[-1]}`", default, (action.help or "").replace("%(const)s",
                                                                                          str(action.const))))
    return [title, "", intro, "", *table(rows, ("flag", "default", "meaning"))]


def site_section() -> list[str]:
    site, privacy = describe(SiteConfig), describe(PrivacyConfig)
    defaults = SiteConfig(data_path="", catalog_path="", state_dir="").privacy  # the site's: DP on
    rows = [(f"`{f.name.replace('_', '-')}`", shown(default_of(f)), site[f.name]) for f in plain_fields(SiteConfig)]
    rows += [(f"`{key}`", shown(getattr(defaults, name)), privacy[name]) for key, name in NODE_PRIVACY_KEYS.items()]
    return ["## A site's node config (a SuperNode's `--node-config`)", "",
            "`fedrec-client` writes these from its flags into `node_config.toml` in the site's state dir; a site "
            "started with Flower's own `flower-supernode` gives them as `--node-config \"data-path='...' "
            "catalog-path='...' state-dir='...' epsilon=8\"`. The server never sets any of them.", "",
            *table(rows, ("key", "default", "meaning"))]


def reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the code by `python -m simulations.config_reference > docs/configuration.md` (a test "
             "fails when the two differ). Every setting has one default, in its typed dataclass; the YAML under "
             "`simulations/conf/`, pyproject's `[tool.flwr.app.config]` and the command-line flags repeat it and "
             "tests check them field by field.", "",
             *hydra_section(), *run_config_section(),
             *flags_section("## `fedrec-server` flags", "The server of a deployment (docs/deployment.md). Run "
                            "settings beyond these go through `--run-config` (above).", server_parser()),
             *flags_section("## `fedrec-client` flags", "A data site (docs/deployment.md, section 5). Each flag "
                            "sets the node-config key of the same name (below); `--no-dp` sets `dp = false`.",
                            client_parser()),
             *site_section(),
             "## The round record (`metrics.jsonl`)", "",
             "A run directory's `metrics.jsonl` holds one JSON object per completed round: what to monitor (the "
             "report and the progress line are made from it). A key appears when it applies.", "",
             *table([(f"`{k}`", v) for k, v in describe(RoundRecord).items()], ("key", "meaning"))]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
