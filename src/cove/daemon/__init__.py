"""The node service (`cove daemon`): image store, enclave registry, supervisors, API.

``client`` imports only the standard library, so lifecycle commands such as
`cove ps` start fast; everything else here runs inside the daemon or a
supervisor. The API is written down in docs/formats/daemon-api.md.
"""
