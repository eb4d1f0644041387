"""Kubernetes integration: device plugin, node agent, admission webhook, operator.

Each component is a long-running `cove k8s ...` command that runs in a
container of the chart in charts/cove. This package sits above runtime/
(beside daemon/ and oci/); it talks to the node service only through its
documented socket API and to the key broker only through cove.kbs.client.
docs/kubernetes.md describes the whole; docs/formats/k8s-annotations.md is the
contract with the runtime.
"""

DOMAIN = "cove.dev"
RUNTIME_CLASS = "cove"
