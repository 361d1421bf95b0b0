"""Run under torchrun by the lifetime test: a worker that reaches `die_with_launcher()` only after
its agent is gone (what a worker still importing torch meets when the agent is SIGKILLed).

    torchrun --nproc_per_node 1 tests/helpers/late_start.py GO_FILE SURVIVED_FILE

Writes its pid to GO_FILE.pid, waits (at most 120 s) until GO_FILE exists, then calls
`die_with_launcher()`; if that returns, it writes SURVIVED_FILE and sleeps, as an orphan would.
"""

import sys
import time
from pathlib import Path

from pipeline.lifetime import die_with_launcher

go, survived = Path(sys.argv[1]), Path(sys.argv[2])
Path(f"{go}.pid").write_text(str(__import__("os").getpid()))
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
die_with_launcher()
survived.write_text("still running\n")
time.sleep(120)
