"""cove.toml validation: every mistake is one line naming the key and the fix."""

from __future__ import annotations

import pytest

from cove import config
from cove.errors import ConfigError
from cove.image.template import config_template


def parse(text: str) -> config.Config:
    return config.parse(text, source="cove.toml")


KBS = '[enclave]\nname = "a"\n[attestation]\nkbs = "https://kbs.example:8443"\n'


def test_template_is_valid_and_complete():
    parsed = parse(config_template("demo"))
    assert parsed.enclave.name == "demo"
    assert parsed.network.mode == "none"
    assert parsed.resources.memory == 512 << 20
    assert [m.target for m in parsed.mounts] == ["/tmp"]
    # every option the schema knows appears in the template
    for key in (
        "product_id",
        "svn",
        "debug",
        "backend",
        "memory",
        "max_processes",
        "max_open_files",
        "entry_points",
        "cwd",
        "user",
        "default",
        "passthrough",
        "mode",
    ):
        assert f"\n{key} = " in config_template("demo"), key


@pytest.mark.parametrize(
    "text, key, words",
    [
        ('[enclave]\nname = "a"\ncolour = 1\n', "enclave.colour", "unknown key"),
        ('[enclave]\nname = "a"\nsvn = "3"\n', "enclave.svn", "must be an integer"),
        ('[enclave]\nname = "a"\nsvn = 70000\n', "enclave.svn", "out of range"),
        ('[enclave]\nname = "a"\ndebug = "yes"\n', "enclave.debug", "true or false"),
        ('[enclave]\nname = "a"\nbackend = "sgx2"\n', "enclave.backend", "not one of"),
        ('[enclave]\nname = "a b"\n', "enclave.name", "not a valid name"),
        ('[enclave]\nname = "a"\n[resources]\nmemory = "-5M"\n', "resources.memory", "not a size"),
        ('[enclave]\nname = "a"\n[resources]\nmemory = -5\n', "resources.memory", "must be positive"),
        ('[enclave]\nname = "a"\n[resources]\nmax_processes = 0\n', "resources.max_processes", "out of range"),
        ('[enclave]\nname = "a"\n[process]\nentry_points = ["bin/"]\n', "process.entry_points", "absolute"),
        ('[enclave]\nname = "a"\n[process]\nentry_points = []\n', "process.entry_points", "non-empty"),
        ('[enclave]\nname = "a"\n[process]\ncwd = "/../etc"\n', "process.cwd", "'..'"),
        ('[enclave]\nname = "a"\n[process]\nuser = "x:y:z"\n', "process.user", "not a user"),
        ('[enclave]\nname = "a"\n[env]\ndefault = { "1X" = "v" }\n', "env.default.1X", "not a valid"),
        ('[enclave]\nname = "a"\n[env]\npassthrough = ["A B"]\n', "env.passthrough", "variable names"),
        ('[enclave]\nname = "a"\n[network]\nmode = "wifi"\n', "network.mode", "not one of"),
        ('[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "nfs"\n', "mounts[0].type", "not one of"),
        ('[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\n', "mounts[0].key", "is required"),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "seal:mrfoo"\n',
            "mounts[0].key",
            "not a sealing policy",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "vault:x"\n',
            "mounts[0].key",
            "unknown key source kind",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "nocolon"\n',
            "mounts[0].key",
            "not a key source",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "insecure:00"\n',
            "mounts[0].key",
            "32 hex digits",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "insecure:'
            + "ab" * 16
            + '"\n',
            "mounts[0].key",
            "refused in a non-debug enclave",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "file:k.key"\n',
            "mounts[0].key",
            "absolute path",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "kbs:"\n',
            "mounts[0].key",
            "not a resource path",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = 5\n',
            "mounts[0].key",
            "must be a string",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            'source = "../up"\n',
            "mounts[0].source",
            "'..'",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            'options = { rollback = "cloud" }\n',
            "mounts[0].options.rollback",
            "not one of",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            'options = { cache = "lots" }\n',
            "mounts[0].options.cache",
            "not a size",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            'options = { size = "1M" }\n',
            "mounts[0].options.size",
            "unknown option",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/a/data"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            '[[mounts]]\ntarget = "/b/data"\ntype = "encrypted"\nkey = "seal:mrsigner"\n',
            "mounts[1].source",
            "also the volume of /a/data",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\nkey = "seal:mrsigner"\n',
            "mounts[0].key",
            "only encrypted mounts",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "host"\n',
            "mounts[0].source",
            "is required for a host mount",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\nsource = "/y"\n',
            "mounts[0].source",
            "only host",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\n',
            "mounts[1].target",
            "mounted twice",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\noptions = { uid = 3 }\n',
            "mounts[0].options.uid",
            "unknown option",
        ),
        ('[enclave]\nname = "a"\n[attestation]\nkbs = "x"\n', "attestation.kbs", "not a broker URL"),
        ('[enclave]\nname = "a"\n[attestation]\nca = "/c.pem"\n', "attestation.kbs", "is required"),
        ('[enclave]\nname = "a"\n[attestation]\nkbs = "https://k"\nca = "c.pem"\n', "attestation.ca", "absolute"),
        (
            '[enclave]\nname = "a"\n[attestation]\nkbs = "https://k"\ntimeout = 0\n',
            "attestation.timeout",
            "out of range",
        ),
        ('[enclave]\nname = "a"\n[attestation]\nkbs = "https://k"\nretry = 1\n', "attestation.retry", "unknown key"),
        (
            KBS + 'ca = "/c.pem"\nkbs_policy = "/p.toml"\n',
            "attestation.kbs_policy",
            "ca and kbs_policy exclude each other",
        ),
        (KBS + 'kbs_policy = "p.toml"\n', "attestation.kbs_policy", "absolute"),
        (KBS + 'kbs_policy = ""\n', "attestation.kbs_policy", "must be a policy file's path or the policy's text"),
        (KBS + "kbs_policy = 3\n", "attestation.kbs_policy", "must be a policy file's path or the policy's text"),
        (
            KBS + 'kbs_policy = "[cove]\\nmeasurements = [\\"zz\\"]"\n',
            "attestation.kbs_policy",
            "cove.measurements[0]: must be a hex string",
        ),
        (
            '[enclave]\nname = "a"\n[attestation]\nkbs = "http://k"\nkbs_policy = "/p.toml"\n',
            "attestation.kbs_policy",
            "https://",
        ),
        (
            '[enclave]\nname = "a"\n[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:X"\n',
            "secrets",
            "needs [attestation]",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/d"\ntype = "encrypted"\nkey = "kbs:a/b/c"\n',
            "mounts[0].key",
            "needs the key broker",
        ),
        (KBS + '[[secrets]]\nname = "s s"\nresource = "a/b/c"\ntarget = "env:X"\n', "secrets[0].name", "not a valid"),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b"\ntarget = "env:X"\n',
            "secrets[0].resource",
            "not a resource path",
        ),
        (KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "disk:X"\n', "secrets[0].target", "not a target"),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:1X"\n',
            "secrets[0].target",
            "not a variable name",
        ),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "file:/etc/pw"\n',
            "secrets[0].target",
            "not on a tmpfs mount",
        ),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "mount:/d"\n',
            "secrets[0].target",
            "names no encrypted mount",
        ),
        (
            KBS + '[[mounts]]\ntarget = "/d"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'
            '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "mount:/d"\n',
            "secrets[0].target",
            "has key 'seal:mrsigner'",
        ),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:X"\n'
            '[[secrets]]\nname = "s"\nresource = "a/b/d"\ntarget = "env:Y"\n',
            "secrets[1].name",
            "used twice",
        ),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:X"\n'
            '[[secrets]]\nname = "t"\nresource = "a/b/d"\ntarget = "env:X"\n',
            "secrets[1].target",
            "target of two secrets",
        ),
        (
            KBS + '[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:X"\nmode = 1\n',
            "secrets[0].mode",
            "unknown key",
        ),
        ('[process]\ncwd = "/"\n', "enclave", "required"),
        ('[enclave\nname = "a"\n', "", "not valid TOML"),
        # ids that would wrap, sizes that would overflow, mounts that hide what the sandbox provides
        ('[enclave]\nname = "a"\n[process]\nuser = "99999999999:1"\n', "process.user", "ids go up to 65535"),
        ('[enclave]\nname = "a"\n[process]\nuser = "1000:65536"\n', "process.user", "ids go up to 65535"),
        (
            '[enclave]\nname = "a"\n[resources]\nmemory = "99999999999T"\n',
            "resources.memory",
            "more than the largest allowed, 64T",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/proc"\ntype = "tmpfs"\n',
            "mounts[0].target",
            "/proc is where the sandbox provides /proc",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/proc/sys"\ntype = "tmpfs"\n',
            "mounts[0].target",
            "where the sandbox provides /proc",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/dev"\ntype = "tmpfs"\n',
            "mounts[0].target",
            "where the sandbox provides /dev",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/dev/attestation"\ntype = "tmpfs"\n',
            "mounts[0].target",
            "where the sandbox provides /dev/attestation",
        ),
        (
            '[enclave]\nname = "a"\n[[mounts]]\ntarget = "/dev/attestation/quote"\ntype = "host"\nsource = "/x"\n',
            "mounts[0].target",
            "where the sandbox provides /dev/attestation",
        ),
    ],
)
def test_each_mistake_is_named(text, key, words):
    with pytest.raises(ConfigError) as caught:
        parse(text)
    line = caught.value.line()
    assert line.startswith("cove.toml: ")
    assert key in line and words in line, line
    assert "\n" not in line


def test_limits_still_accept_what_is_valid():
    parsed = parse(
        '[enclave]\nname = "a"\n[resources]\nmemory = "64T"\n[process]\nuser = "65535:0"\n'
        '[[mounts]]\ntarget = "/dev/shm"\ntype = "tmpfs"\n'
    )
    assert parsed.resources.memory == 64 << 40 and parsed.process.user == "65535:0"
    assert parsed.mounts[0].target == "/dev/shm"


def test_sizes_accept_units():
    parsed = parse('[enclave]\nname = "a"\n[resources]\nmemory = "1G"\n')
    assert parsed.resources.memory == 1 << 30
    parsed = parse('[enclave]\nname = "a"\n[resources]\nmemory = 4096\n')
    assert parsed.resources.memory == 4096


def test_measured_form_is_order_independent():
    a = parse('[enclave]\nname = "a"\n[env]\ndefault = { B = "2", A = "1" }\npassthrough = ["Y", "X"]\n')
    b = parse('[env]\npassthrough = ["X", "Y"]\ndefault = { A = "1", B = "2" }\n[enclave]\nname = "a"\n')
    assert config.to_measured(a) == config.to_measured(b)


ENCRYPTED = '[enclave]\nname = "a"\n{enclave}[[mounts]]\ntarget = "/data"\ntype = "encrypted"\n{more}'


def test_encrypted_mount_defaults():
    mount = parse(ENCRYPTED.format(enclave="", more='key = "seal:mrsigner"\n')).mounts[0]
    assert (mount.type, mount.target, mount.source, mount.key, mount.writable) == (
        "encrypted",
        "/data",
        "data",
        "seal:mrsigner",
        True,
    )
    assert dict(mount.options) == {}


def test_encrypted_mount_fields():
    text = ENCRYPTED.format(
        enclave="",
        more='key = "file:/etc/cove/v.key"\nsource = "vols/d/"\n'
        'writable = false\noptions = { rollback = "file", cache = "8M" }\n',
    )
    mount = parse(text).mounts[0]
    assert (mount.source, mount.key, mount.writable) == ("vols/d", "file:/etc/cove/v.key", False)
    assert dict(mount.options) == {"rollback": "file", "cache": "8M"}
    absolute = parse(
        ENCRYPTED.format(enclave="", more='key = "kbs:default/k/d"\nsource = "/srv/vol"\n')
        + '[attestation]\nkbs = "https://kbs.example:8443"\n'
    )
    assert absolute.mounts[0].source == "/srv/vol"


def test_insecure_key_only_in_debug_enclaves():
    key = 'key = "insecure:' + "00112233445566778899aabbccddeeff" + '"\n'
    assert parse(ENCRYPTED.format(enclave="debug = true\n", more=key)).mounts[0].key.startswith("insecure:")
    with pytest.raises(ConfigError, match="refused in a non-debug enclave"):
        parse(ENCRYPTED.format(enclave="debug = false\n", more=key))


def test_encrypted_mount_is_measured_with_its_key_and_options():
    base = config.to_measured(parse(ENCRYPTED.format(enclave="", more='key = "seal:mrsigner"\n')))
    assert base["mounts"] == [
        {
            "target": "/data",
            "type": "encrypted",
            "source": "data",
            "writable": True,
            "options": {},
            "key": "seal:mrsigner",
        }
    ]
    for more in (
        'key = "seal:mrenclave"\n',
        'key = "seal:mrsigner"\nsource = "other"\n',
        'key = "seal:mrsigner"\nwritable = false\n',
        'key = "seal:mrsigner"\noptions = { rollback = "none" }\n',
    ):
        assert config.to_measured(parse(ENCRYPTED.format(enclave="", more=more))) != base, more


def test_other_mounts_measure_as_before():
    parsed = parse('[enclave]\nname = "a"\n[[mounts]]\ntarget = "/x"\ntype = "tmpfs"\n')
    assert config.to_measured(parsed)["mounts"] == [
        {"target": "/x", "type": "tmpfs", "source": None, "writable": True, "options": {}}
    ]


SECRETS = (
    KBS + 'ca = "/etc/cove/kbs-ca.pem"\n'
    '[[mounts]]\ntarget = "/run/secrets"\ntype = "tmpfs"\n'
    '[[mounts]]\ntarget = "/data"\ntype = "encrypted"\nkey = "kbs:app/vol/key"\n'
    '[[secrets]]\nname = "db"\nresource = "app/db/password"\ntarget = "file:/run/secrets/db"\n'
    '[[secrets]]\nname = "token"\nresource = "app/api/token"\ntarget = "env:API_TOKEN"\n'
    '[[secrets]]\nname = "volume"\nresource = "app/vol/key"\ntarget = "mount:/data"\n'
)


def test_attestation_and_secrets():
    parsed = parse(SECRETS)
    assert parsed.attestation == config.AttestationSection("https://kbs.example:8443", "/etc/cove/kbs-ca.pem", 30, 2)
    assert [(s.name, s.resource, s.kind, s.where) for s in parsed.secrets] == [
        ("db", "app/db/password", "file", "/run/secrets/db"),
        ("token", "app/api/token", "env", "API_TOKEN"),
        ("volume", "app/vol/key", "mount", "/data"),
    ]


def test_attestation_and_secrets_are_measured():
    measured = config.to_measured(parse(SECRETS))
    assert measured["attestation"] == {
        "kbs": "https://kbs.example:8443",
        "ca": "/etc/cove/kbs-ca.pem",
        "timeout": 30,
        "retries": 2,
    }
    assert measured["secrets"][1] == {"name": "token", "resource": "app/api/token", "target": "env:API_TOKEN"}
    for old, new in (
        ("kbs.example", "evil.example"),
        ("kbs-ca.pem", "other-ca.pem"),
        ("app/api/token", "app/api/other"),
        ("env:API_TOKEN", "env:OTHER"),
    ):
        assert config.to_measured(parse(SECRETS.replace(old, new))) != measured, old
    # an enclave without them measures as before
    assert "attestation" not in config.to_measured(parse('[enclave]\nname = "a"\n'))


def test_kbs_policy_path_or_inline_is_measured():
    by_path = parse(KBS + 'kbs_policy = "/etc/cove/kbs-policy.toml"\n')
    assert by_path.attestation.kbs_policy == "/etc/cove/kbs-policy.toml" and by_path.attestation.ca is None
    inline = parse(KBS + 'kbs_policy = """\ntypes = ["cove"]\n[cove]\nmeasurements = ["' + "ab" * 32 + '"]\n"""\n')
    assert inline.attestation.kbs_policy.startswith('types = ["cove"]')
    measured = config.to_measured(inline)["attestation"]
    assert measured["kbs_policy"] == inline.attestation.kbs_policy
    assert config.to_measured(parse(KBS))["attestation"].keys() == {"kbs", "ca", "timeout", "retries"}
    assert config.to_measured(by_path) != config.to_measured(parse(KBS + 'kbs_policy = "/etc/other.toml"\n'))


def test_template_examples_are_valid_when_uncommented():
    """The commented examples in cove.toml stay in step with the schema."""
    text = config_template("demo")
    start = text.index("# An encrypted")
    example = "\n".join(
        line[2:]
        if line.startswith("# ") and not line.startswith("# key:") and ("=" in line or line.startswith("# ["))
        else line
        for line in text[start:].splitlines()
    )
    parsed = parse(text[:start] + example)
    assert [m.type for m in parsed.mounts] == ["tmpfs", "encrypted"]
    assert config.to_measured(parsed)["secrets"][0]["target"] == "env:DB_PASSWORD"


def test_config_checks_key_sources_and_inline_policies_without_the_layers_above():
    """config validates key sources and inline broker policies itself: fs and kbs are never imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cove import config\n"
        'config.parse(\'[enclave]\\nname = "a"\\n[[mounts]]\\ntarget = "/x"\\ntype = "encrypted"\\n'
        'key = "seal:mrsigner"\\n[attestation]\\nkbs = "https://kbs.example"\\n'
        'kbs_policy = "version = 1"\\n\')\n'
        "print(sorted(m for m in sys.modules if m.startswith(('cove.fs', 'cove.kbs', 'cove.image'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
