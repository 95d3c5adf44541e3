"""The consortium's registered sites: a directory with one `<name>.pub` per site (its SuperNode public key).

SuperNode authentication (`flower-superlink --enable-supernode-auth`) lets in only keys registered through the
Control API (`flwr supernode register`). Flower keeps registrations in the SuperLink's state, which fedrec-server
holds in memory, so fedrec-server registers every key in the directory each time it starts its SuperLink, and
`fedrec-admin site-add/site-remove` change the directory and, with --server-out-dir, the running SuperLink too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fl_server.control import CONNECTION, flwr
from shared_model.atomic import write_text_atomically
from shared_model.key_files import check_name, load_site_public_key

log = logging.getLogger("fedrec-server")
REGISTERED = "registered_sites.json"  # name -> Flower node id, next to the running SuperLink's files


def registry(sites_dir: Path) -> dict[str, Path]:
    """Site name -> public key file, each key checked; two names with one key are refused."""
    if not sites_dir.is_dir():
        raise FileNotFoundError(f"--sites {sites_dir}: no such directory (add sites with fedrec-admin site-add)")
    sites: dict[str, Path] = {}
    owners: dict[str, str] = {}
    for path in sorted(sites_dir.glob("*.pub")):
        key = load_site_public_key(path)
        if key in owners:
            raise ValueError(f"{path}: the same key as site {owners[key]!r}; one key per site")
        owners[key] = check_name(path.stem, f"{path}: site name")
        sites[path.stem] = path
    return sites


def add_site(sites_dir: Path, name: str, public_key: Path) -> Path:
    """Copy a site's public key into the registry as `<name>.pub` (checked; a new key never replaces an old one)."""
    key = load_site_public_key(public_key)
    target = sites_dir / f"{check_name(name, 'site name')}.pub"
    existing = registry(sites_dir) if sites_dir.exists() else {}
    for other, path in existing.items():
        if load_site_public_key(path) == key and other != name:
            raise ValueError(f"{public_key}: already registered as site {other!r}")
    if target.exists() and load_site_public_key(target) != key:
        raise FileExistsError(f"{target}: site {name!r} already has another key; remove it first (site-remove)")
    sites_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{key} {name}\n", encoding="ascii")
    return target


def remove_site(sites_dir: Path, name: str) -> Path:
    """Delete `<name>.pub` from the registry (the site can no longer join a SuperLink started after this)."""
    target = sites_dir / f"{check_name(name, 'site name')}.pub"
    if not target.exists():
        raise FileNotFoundError(f"{target}: no site {name!r} in {sites_dir}")
    target.unlink()
    return target


def register_command(public_key: Path, name: str) -> list[str]:
    """`flwr supernode register` for one site key, on fedrec's connection, answering in JSON."""
    return ["supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json"]


def unregister_command(node_id: int) -> list[str]:
    """`flwr supernode unregister` for one node id."""
    return ["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"]


def list_command() -> list[str]:
    """`flwr supernode ls`: every node the SuperLink knows, in JSON."""
    return ["supernode", "ls", CONNECTION, "--format", "json"]


def json_answer(text: str, command: list[str]) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (the last one; it may span lines)."""
    lines = text.splitlines()
    for start in reversed([i for i, line in enumerate(lines) if line.startswith("{")]):
        try:
            value = json.loads("\n".join(lines[start:]))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("success") is False:  # `--format json` exits 0 on failure
            raise RuntimeError(f"flwr {' '.join(command)} failed: {value.get('error-message', value)}")
        if isinstance(value, dict):
            return value
    raise RuntimeError(f"flwr {' '.join(command)} printed no JSON answer: {text[-500:]}")


def register(name: str, public_key: Path, flower_dir: Path, env: dict[str, str]) -> int:
    """Register one site with the running SuperLink and record its node id; returns the node id."""
    command = register_command(public_key, name)
    node_id = int(json_answer(flwr(command, env), command)["node-id"])
    ids = registered(flower_dir)
    ids[name] = node_id
    write_text_atomically(flower_dir / REGISTERED, json.dumps(ids, indent=2) + "\n")
    return node_id


def register_all(sites_dir: Path, flower_dir: Path, env: dict[str, str]) -> dict[str, int]:
    """Register every site of the registry with a freshly started SuperLink."""
    sites = registry(sites_dir)
    if not sites:
        raise ValueError(f"--sites {sites_dir}: no site keys (<name>.pub); add them with fedrec-admin site-add")
    write_text_atomically(flower_dir / REGISTERED, "{}\n")  # a restarted SuperLink knows none of the old ids
    ids = {name: register(name, path, flower_dir, env) for name, path in sites.items()}
    log.info("SuperNode authentication: %d registered sites may join (%s)", len(ids),
             ", ".join(f"{name}=node {node}" for name, node in ids.items()))
    return ids


def unregister(name: str, flower_dir: Path, env: dict[str, str]) -> int:
    """Unregister one site from the running SuperLink (its SuperNode is refused from now on)."""
    ids = registered(flower_dir)
    if name not in ids:
        raise KeyError(f"{flower_dir / REGISTERED}: site {name!r} is not registered with this SuperLink")
    node_id = ids.pop(name)
    command = unregister_command(node_id)
    json_answer(flwr(command, env), command)
    write_text_atomically(flower_dir / REGISTERED, json.dumps(ids, indent=2) + "\n")
    return node_id


def registered(flower_dir: Path) -> dict[str, int]:
    """Site name -> node id registered with the SuperLink of this server run ({} if none yet)."""
    path = flower_dir / REGISTERED
    if not path.exists():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a name -> node id map ({err})") from err
