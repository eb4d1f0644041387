"""A program whose stdout is the user's terminal (no pseudo-terminal of its own) cannot leave it changed.

The program runs in a session of its own, so nothing stops it from turning echo off or setting the
window size of the terminal it writes to; `cove run` puts back what changed when the run ends.
Run under `script` (a real terminal), as root and as an unprivileged user.
"""

from __future__ import annotations

import shlex
import subprocess

from tests.conftest import require
from tests.e2e.helpers import make_instance

BEFORE = "stty cols 80 rows 24 echo"
SHOW = 'echo "$0: $(stty size) $(stty -a | grep -o -- " -*echo " | head -n 1)"'


def test_terminal_settings_are_put_back_after_the_run(whoever):
    script = require("script")
    cove, parent, probe = whoever
    app = make_instance(cove, parent, probe, name="term")
    run = shlex.join(cove.popen_args("run", "/bin/probe", "tty-settings"))
    line = f"{BEFORE}; sh -c '{SHOW}' before; {run}; sh -c '{SHOW}' after"
    result = subprocess.run(
        [script, "-qec", line, "/dev/null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=cove.env,
        cwd=app,
        timeout=120,
    )
    output = result.stdout.replace("\r", "")
    assert "tty-settings: changed" in output, output  # the program did change them
    assert "before: 24 80 echo" in " ".join(output.split()), output
    assert "after: 24 80 echo" in " ".join(output.split()), output
