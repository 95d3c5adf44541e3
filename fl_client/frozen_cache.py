"""The run's frozen public tensors (item features, fixed tables) kept on the site's disk by their digest, so
the server sends them to a site once, not with every message (they are about half of a Beauty message).
The site keeps the `cache_keep` digests it used last; one removed too early is only sent again."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from fl_client.round_config import check_frozen_digest
from fl_client.site import FileMemo, SiteConfig, keep_latest, mark_in_use
from shared_model import wire
from shared_model.atomic import write_atomically

if TYPE_CHECKING:  # imported where tensors are read: the protocol stages import no torch (fl_client.client_app)
    import torch


# A long-lived process (a simulated sites' worker) reads and checks a site's kept frozen tensors once while the
# file is unchanged (fl_client.site.FileMemo; Beauty's title features, 18 MB, took about 30 ms a message to read
# and hash). The sites of a run hold the same tensors: the checked copies of the last two digests are SHARED by
# every site's entry, which therefore counts no bytes.
KEPT = FileMemo(max_bytes=0, max_entries=4096)
SHARED: dict[str, dict[str, torch.Tensor]] = {}


class FrozenTensorsError(RuntimeError):
    """The message's frozen tensors are not the ones it names, or it carried none and the site holds no intact
    copy of them."""


def frozen_path(site: SiteConfig, digest: str) -> Path:
    """Where the site keeps the frozen tensors with this digest; the digest is checked (64 lowercase hex) before
    any path is formed, so a server's `../..` never names a file outside the site's frozen/ folder."""
    return Path(site.state_dir) / "frozen" / f"{check_frozen_digest(digest)}.safetensors"


def frozen_tensors(site: SiteConfig, digest: str, sent: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The run's frozen tensors: those the message carried (checked against `digest`, then kept on disk), or
    else the site's kept copy. No digest (a server that names none): whatever the message carried."""
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    if not digest:
        return dict(sent or {})
    path = frozen_path(site, digest)
    if sent:
        received = dict(sent)
        if wire.tensors_digest(received) != digest:
            raise FrozenTensorsError(f"the frozen tensors in the message do not match their digest "
                                     f"{wire.FROZEN_DIGEST}={digest}: refusing them")
        if path.exists():
            mark_in_use(path)
        else:
            write_atomically(path, lambda out: out.write(save_tensors(received)))
            keep_latest(path, "*.safetensors", site.cache_keep)
        return received
    if not path.exists():
        raise FrozenTensorsError(f"the server sent no frozen tensors and this site holds none with digest "
                                 f"{digest} (looked for {path}); the server sends them again next round")

    def checked_copy(kept_path: Path) -> dict[str, torch.Tensor]:
        try:
            kept = load_tensors(kept_path.read_bytes())
        except SafetensorError:
            kept = {}
        if wire.tensors_digest(kept) != digest:
            kept_path.unlink(missing_ok=True)  # damaged on disk: dropped, so the next message brings them again
            raise FrozenTensorsError(f"the frozen tensors kept at {kept_path} are damaged (their digest is not "
                                     f"{digest}); removed them, the server sends them again next round")
        if digest not in SHARED:
            if len(SHARED) >= 2:
                SHARED.pop(next(iter(SHARED)))  # the oldest
            SHARED[digest] = kept
        return SHARED[digest]

    kept = KEPT.read(path, checked_copy, lambda _: 0)
    mark_in_use(path)
    return dict(kept)
