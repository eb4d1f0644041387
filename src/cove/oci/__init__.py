"""Enclaves as OCI containers: `cove package --oci` images and the `cove-runtime` OCI runtime.

This package sits above cove.runtime (beside cove.daemon); nothing below
imports it. Formats: docs/formats/oci.md; use: docs/containers.md.
"""

DOMAIN = "cove.dev"  # the annotation domain shared with cove.k8s
# Where the signed build travels inside an image's root file system.
COVE_DIR = ".cove"
