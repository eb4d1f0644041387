"""The key broker: attestation-gated secrets over the KBS protocol.

``cove kbs serve`` speaks the Confidential Containers KBS attestation protocol
(``/kbs/v0/auth`` → ``/kbs/v0/attest`` → ``/kbs/v0/resource/...``), appraises
evidence with :mod:`cove.attest`, and releases a secret only as a JWE
encrypted to the attested TEE's key and only when the secret's release policy
accepts the attestation result. The parts:

- :mod:`cove.kbs.problems`: RFC 7807 problem types (status + type per denial);
- :mod:`cove.kbs.store`: SQLite or PostgreSQL storage, schema migrations;
- :mod:`cove.kbs.vault`: the master key and encryption of secrets at rest;
- :mod:`cove.kbs.secrets`: secret kinds, generation, versions, rotation;
- :mod:`cove.kbs.evidence_appraisal`: tee types, evidence verification, report-data binding;
- :mod:`cove.kbs.broker_policy`: attestation and release policies;
- :mod:`cove.kbs.jose`: attestation tokens, admin tokens, JWE responses (joserfc);
- :mod:`cove.kbs.broker`: the protocol logic, independent of HTTP;
- :mod:`cove.kbs.server`: the FastAPI application (OpenAPI at /openapi.json);
- :mod:`cove.kbs.runner`: ``init``, ``serve`` and a broker embedded in a thread;
- :mod:`cove.kbs.tls`: a local TLS CA and server certificate;
- :mod:`cove.kbs.broker_ratls`: RA-TLS for a broker in an enclave, and clients that verify it by policy;
- :mod:`cove.kbs.client`: the client (and admin client), usable inside an enclave.

Provisioning into enclaves before they start is :mod:`cove.runtime.provisioning`.
"""
