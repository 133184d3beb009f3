"""Run the README's walk-through verbatim, as a new user on a fresh machine would.

Every fenced ``bash`` block that follows a ``<!-- ci: walkthrough -->`` line is run top to bottom
(set-up and test lines excepted: CI runs those itself) in an empty folder, with no
``SLIMGPT_DATA`` and an empty ``SLIMGPT_CACHE``, so CI fails whenever a fresh machine would.
Exit status: the first failing command's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "<!-- ci: walkthrough -->"
SKIP = ("scripts/setup.sh", "pytest")


def commands(readme: str) -> list[str]:
    out: list[str] = []
    for block in re.findall(re.escape(MARKER) + r"\s*```bash\n(.*?)```", readme, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            cmd = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("python -c") else line.strip()
            if cmd and not cmd.startswith("#") and not any(s in cmd for s in SKIP):
                out.append(cmd)
    return out


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    cmds = commands((root / "README.md").read_text())
    if not cmds:
        print("readme walkthrough: no commands found after the marker", file=sys.stderr)
        return 1
    env = {k: v for k, v in os.environ.items() if k != "SLIMGPT_DATA"}
    with tempfile.TemporaryDirectory(prefix="slimgpt-walkthrough-") as work:
        env["SLIMGPT_CACHE"] = str(Path(work) / "cache")
        run_dir = Path(work) / "run"
        run_dir.mkdir()
        for cmd in cmds:
            print(f"$ {cmd}", flush=True)
            t = time.perf_counter()
            rc = subprocess.run(["bash", "-c", cmd], cwd=run_dir, env=env, stdin=subprocess.DEVNULL).returncode
            print(f"  -> exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
            if rc != 0:
                return rc
    print(f"readme walkthrough: {len(cmds)} commands passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
