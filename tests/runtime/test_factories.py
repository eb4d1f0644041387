"""The runtime's service factories: every "module:function" string names a real factory.

The daemon and the OCI runtime swap the per-run /dev/attestation factory for the node's by its
string; a renamed module would otherwise leave the swap silently undone.
"""

from __future__ import annotations

import importlib

import pytest

from cove.daemon import supervisor
from cove.oci import launch
from cove.runtime import enclave_services


def resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("spec", enclave_services.FACTORIES)
def test_each_factory_resolves(spec):
    assert callable(resolve(spec))


@pytest.mark.parametrize(
    "per_run, node",
    [
        (supervisor.PER_RUN_ATTESTATION, supervisor.ATTESTATION),
        (launch.PER_RUN_ATTESTATION, launch.NODE_ATTESTATION),
    ],
)
def test_the_node_attestation_swap_names_real_factories(per_run, node):
    assert per_run in enclave_services.FACTORIES
    assert callable(resolve(node))
