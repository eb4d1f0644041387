"""The sandbox's measured switches and its host ids, without starting an enclave.

What the filter and the id mapping do inside a running enclave is tested in
tests/e2e/test_isolation.py and test_unprivileged.py.
"""

from __future__ import annotations

import pytest

from cove import config, hostids
from cove.errors import ConfigError, SetupError
from cove.runtime import seccomp

BASE = '[enclave]\nname = "app"\n'


def test_io_uring_is_denied_unless_the_measured_config_allows_it():
    assert seccomp.compile_filter("none") != seccomp.compile_filter("none", io_uring=True)
    default = config.parse(BASE)
    assert default.security.io_uring is False
    assert "security" not in config.to_measured(default)  # older manifests keep their measurement
    allowed = config.parse(BASE + "[security]\nio_uring = true\n")
    assert config.to_measured(allowed)["security"] == {"io_uring": True}


@pytest.mark.parametrize("text", ['[security]\nio_uring = "yes"\n', "[security]\nseccomp = false\n"])
def test_bad_security_sections_are_refused(text):
    with pytest.raises(ConfigError, match="security"):
        config.parse(BASE + text)


def test_the_id_range_comes_from_subordinate_ids(tmp_path, monkeypatch):
    monkeypatch.delenv(hostids.ENVIRONMENT, raising=False)
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\ncove:165536:65536\n")
    subgid.write_text("cove:200000:65536\n")
    monkeypatch.setattr(hostids, "SUBUID", str(subuid))
    monkeypatch.setattr(hostids, "SUBGID", str(subgid))
    ids = hostids.root_range()
    assert (ids.uid, ids.gid, ids.count) == (165536, 200000, 65536)
    assert ids.host(0, 0) == (165536, 200000) and ids.inside(165536 + 7, 200000) == (7, 0)
    assert ids.inside(0, 0) == (0, 0)  # host root stays host root: never in the range


@pytest.mark.parametrize(
    "subuid, env, message",
    [
        ("", None, "has no cove entry"),
        ("cove:0:65536\n", None, "must start above 0"),
        ("cove:100000:10\n", None, "at least 65536"),
        ("cove:x:65536\n", None, "not NAME:START:COUNT"),
        ("", "0:65536", "must start above 0"),
        ("", "abc", "must be START:COUNT"),
    ],
)
def test_a_missing_or_hostile_id_range_is_refused(tmp_path, monkeypatch, subuid, env, message):
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text("cove:100000:65536\n")
    monkeypatch.setattr(hostids, "SUBUID", str(tmp_path / "subuid"))
    monkeypatch.setattr(hostids, "SUBGID", str(tmp_path / "subgid"))
    if env is None:
        monkeypatch.delenv(hostids.ENVIRONMENT, raising=False)
    else:
        monkeypatch.setenv(hostids.ENVIRONMENT, env)
    with pytest.raises(SetupError, match=message):
        hostids.root_range()
