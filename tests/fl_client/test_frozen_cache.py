"""A site's kept copies of frozen public tensors: verified by digest, the latest used kept, older ones removed."""

import os

import pytest
import torch

from fl_client.frozen_cache import FrozenTensorsError, frozen_path, frozen_tensors
from fl_client.site import SiteConfig
from shared_model import wire


def tables(count: int) -> list[tuple[str, dict]]:
    """`count` distinct frozen-tensor sets with their digests (as a new feature table per run would give)."""
    sets = [{"item_features": torch.full((4, 2), float(i))} for i in range(count)]
    return [(wire.tensors_digest(tensors), tensors) for tensors in sets]


def test_a_site_keeps_the_frozen_tensors_it_used_last_and_removes_older_ones(tmp_path):
    site = SiteConfig(data_path="-", catalog_path="-", state_dir=str(tmp_path), cache_keep=2)
    (a, tensors_a), (b, tensors_b), (c, tensors_c) = tables(3)
    frozen_tensors(site, a, tensors_a)
    frozen_tensors(site, b, tensors_b)
    os.utime(frozen_path(site, b), ns=(1, 1))
    assert torch.equal(frozen_tensors(site, a, None)["item_features"], tensors_a["item_features"])  # a: used again
    frozen_tensors(site, c, tensors_c)  # a third run: b is the least recently used
    assert {path.name for path in (tmp_path / "frozen").iterdir()} == {f"{a}.safetensors", f"{c}.safetensors"}
    with pytest.raises(FrozenTensorsError, match="holds none"):
        frozen_tensors(site, b, None)  # removed: the server sends it again, and the site keeps it again
    assert torch.equal(frozen_tensors(site, b, tensors_b)["item_features"], tensors_b["item_features"])
    assert frozen_path(site, b).exists() and len(list((tmp_path / "frozen").iterdir())) == 2


def test_a_site_must_keep_at_least_the_copy_in_use():
    with pytest.raises(ValueError, match="cache_keep must be at least 1"):
        SiteConfig(data_path="-", catalog_path="-", state_dir="-", cache_keep=0)


def test_a_process_checks_a_sites_kept_copy_once_while_the_file_is_unchanged(tmp_path, monkeypatch):
    import safetensors.torch

    from fl_client import site as site_module

    monkeypatch.setattr(site_module, "RACY_NS", 0)  # the file is written just now (test_site_safety.py)
    site = SiteConfig(data_path="-", catalog_path="-", state_dir=str(tmp_path))
    ((digest, tensors),) = tables(1)
    reads, load = [], safetensors.torch.load
    monkeypatch.setattr(safetensors.torch, "load", lambda data: reads.append(1) or load(data))
    frozen_tensors(site, digest, tensors)  # sent once, kept on disk
    for _ in range(3):  # the messages that follow carry none
        assert torch.equal(frozen_tensors(site, digest, None)["item_features"], tensors["item_features"])
    assert len(reads) == 1
    path = frozen_path(site, digest)
    path.write_bytes(path.read_bytes()[:-1])  # damaged
    with pytest.raises(FrozenTensorsError, match="damaged"):
        frozen_tensors(site, digest, None)
    assert not path.exists()


def test_a_kept_copy_swapped_for_other_tensors_of_the_same_size_is_refused_after_it_was_kept(tmp_path, monkeypatch):
    from safetensors.torch import save

    from fl_client import site as site_module

    monkeypatch.setattr(site_module, "RACY_NS", 0)
    site = SiteConfig(data_path="-", catalog_path="-", state_dir=str(tmp_path))
    (digest, tensors), (_, others) = tables(2)
    frozen_tensors(site, digest, tensors)
    frozen_tensors(site, digest, None)  # checked and kept by this process
    path = frozen_path(site, digest)
    swapped = tmp_path / "swapped.safetensors"
    swapped.write_bytes(save(others))
    assert swapped.stat().st_size == path.stat().st_size
    os.replace(swapped, path)  # as an outsider with write access to the state dir would
    with pytest.raises(FrozenTensorsError, match="damaged"):
        frozen_tensors(site, digest, None)
