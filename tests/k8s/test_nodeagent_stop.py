"""The node agent's SIGTERM ends it, whenever it lands.

The handler used to set a threading.Event: when the signal interrupted the
main thread while it held the event's own lock (entering or leaving its
wait), the handler waited for that lock forever, and the agent never ended
(seen once in CI). Here the agent waits a few microseconds between rounds,
so most signals land in that window.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

AGENT = """
import signal
from cove.k8s.health import Health
from cove.k8s.nodeagent import Agent
agent = Agent(lambda values: None, probe=lambda: Health(True, "ok", {}), interval=0.00001)
signal.signal(signal.SIGTERM, lambda *_: agent.stop())
print("ready", flush=True)
agent.run()
"""


def test_sigterm_ends_the_agent_wherever_it_lands():
    rng = random.Random(7)
    agents = [subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE) for _ in range(12)]
    try:
        for agent in agents:
            assert agent.stdout is not None and agent.stdout.readline() == b"ready\n"
        for agent in agents:
            time.sleep(rng.uniform(0, 0.05))
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            assert agent.wait(timeout=20) == 0, "the agent did not end on SIGTERM"
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
