"""Run every `dbbatch ...` line of README.md's console blocks, as a new user would (CI calls this after
`make demo`). Fails on the first command that exits non-zero. Usage: python scripts/check_readme.py"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands(text: str) -> list[str]:
    """Lines of ```console blocks that start with `dbbatch` or `make`, comments stripped."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("  #", 1)[0].strip()
            if cmd.startswith(("dbbatch ", "make ")):
                out.append(cmd)
    return out


def main() -> int:
    bin_dir = REPO / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for cmd in readme_commands((REPO / "README.md").read_text()):
        if cmd.startswith("make "):
            continue  # make demo / make test are run by .ci/run itself
        print(f"$ {cmd}", flush=True)
        proc = subprocess.run(shlex.split(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = proc.stdout.strip().splitlines()[-3:]
        print("\n".join(f"  {line}" for line in tail))
        if proc.returncode != 0:
            print(f"README command failed with exit code {proc.returncode}: {cmd}\n{proc.stdout[-3000:]}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
