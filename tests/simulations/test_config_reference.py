"""docs/configuration.md is the generated reference (never edited by hand), every setting documents itself, and
fedrec-client's flags default to the site settings they set."""

from dataclasses import dataclass
from pathlib import Path

from fl_client.site import NODE_PRIVACY_KEYS, SiteConfig
from fl_client.supernode import build_parser
from simulations.config_reference import field_comments, plain_fields, reference

ROOT = Path(__file__).resolve().parents[2]
# fedrec-client's flags that name a site setting by another name (`--no-dp` sets dp = false)
FLAG_FOR = {"data_path": "data", "catalog_path": "catalog", "data_format": "format"}


def test_the_committed_reference_is_what_the_code_generates():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference(), \
        "docs/configuration.md is out of date: python -m simulations.config_reference > docs/configuration.md"


@dataclass
class Documented:
    """A class whose fields document themselves in each of the three ways the code does."""

    # (str) a long meaning written above its field
    above: str = "a"
    trailing: int = 1  # (int) a meaning after the field
    continued: float = 2.0  # (float) a meaning that goes on
    # on the next line
    last: bool = True  # (bool) the last one


def test_each_field_gets_its_own_comment_without_the_type():
    assert field_comments(Documented) == {"above": "a long meaning written above its field",
                                          "trailing": "a meaning after the field",
                                          "continued": "a meaning that goes on on the next line",
                                          "last": "the last one"}


def test_every_site_setting_has_a_client_flag_with_the_same_default():
    flags = {action.dest: action for action in build_parser()._actions}
    site = SiteConfig(data_path="", catalog_path="", state_dir="")
    checked = 0
    for f in plain_fields(SiteConfig):
        flag = flags[FLAG_FOR.get(f.name, f.name)]
        assert flag.required if f.name in ("data_path", "catalog_path", "state_dir") else \
            flag.default == getattr(site, f.name), f"--{flag.dest}: {flag.default!r} vs SiteConfig.{f.name}"
        checked += 1
    for name in NODE_PRIVACY_KEYS.values():
        if name == "enabled":
            assert flags["no_dp"].default is (not site.privacy.enabled) is False
        else:
            assert flags[name].default == getattr(site.privacy, name), f"--{name} vs PrivacyConfig.{name}"
        checked += 1
    assert checked == len(plain_fields(SiteConfig)) + len(NODE_PRIVACY_KEYS) == 20
