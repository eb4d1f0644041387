"""The platform monitor: the platform attestation key, its TPM endorsement, reports, /dev/attestation.

``monitor`` sets the platform up and loads it; ``pak`` keeps the key;
``tpm2`` and ``swtpm`` talk to the TPM; ``endorse`` makes each epoch's
endorsement; ``reports`` signs enclave reports; ``service``,
``devattest`` and ``devattest_server`` serve /dev/attestation to enclaves.
``sealing`` and ``root_secret`` hold the sealing keys of the secure file system.
"""
