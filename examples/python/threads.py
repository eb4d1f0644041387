"""A daemon thread still running when the interpreter exits: glibc unwinds it
with libgcc_s, which it loads at run time (cove add brings it)."""

import threading
import time


def spin() -> None:
    while True:
        time.sleep(0.001)


for _ in range(4):
    threading.Thread(target=spin, daemon=True).start()
time.sleep(0.01)
print("threads ok")
