"""What the terminal shows: our log lines, the libraries' noise kept out of them, and the results table."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def setup_logging(debug: bool) -> None:
    """Our log lines on stderr (rich on a terminal, timestamped lines elsewhere); the libraries' at WARNING."""
    level = logging.DEBUG if debug else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("dbbatch").setLevel(level)
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "botocore", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # torchdata's StatefulDataLoader constructor calls a deprecated torch API; two lines of noise per subject
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice on every load; keep the log for our lines."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def print_results(results: Any) -> None:
    """The results table on stdout (160 columns when stdout is not a terminal, so logs keep whole rows)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dbbatch results")
    for col in ("subject", "status", "steps", "loss", "seconds", "output / error"):
        table.add_column(col)
    for r in results:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        status, note = (f"{r.status}, flagged", f"{r.output} ({'; '.join(r.flags)})") if r.flags else (r.status, r.output)
        table.add_row(r.id, status, str(r.steps or "-"), loss, f"{r.seconds:.1f}", r.message if r.status == "failed" else note)
    Console(width=160 if not sys.stdout.isatty() else None).print(table)
