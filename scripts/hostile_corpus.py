"""Print the hostile-input corpus as "case -> line": every bad input and the exact line dbbatch prints for it.

Runs tests/test_hostile_inputs.py and tests/test_healing.py (a few minutes); the lines are the ones the tests
observed and asserted.
Usage: python scripts/hostile_corpus.py [extra pytest args]
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        env = {**os.environ, "HOSTILE_CORPUS": str(corpus)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests" / "test_hostile_inputs.py"), str(REPO / "tests" / "test_healing.py"),
                               *sys.argv[1:]],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        lines = corpus.read_text(encoding="utf-8").splitlines() if corpus.exists() else []
    for line in lines:
        print(line)
    print(f"{len({line.split(' -> ')[0] for line in lines})} cases", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
