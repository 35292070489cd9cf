"""DDP inside one pod: only `trainer.fit` runs in several processes, one per device.

Lightning's default "ddp" launcher re-runs the command line once per rank, which here would re-run the whole
batch (images, priors, sampling, publishing) in every rank. Instead the worker stays one process and fit()
spawns the ranks (Lightning's ddp_spawn: each rank unpickles the trainer, module, loader and callbacks). Rank 0's
trained weights come back through Lightning's launcher; this launcher subclass also brings back what the worker
reports (global step, per-step losses, checkpoint timings), turns a rank's exception back into the original
DbbatchError in the main process, relays progress to the main process's reporter (which cannot be pickled),
and passes the main process's SIGTERM on to the ranks.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from dbbatch.core import faults, signals

log = logging.getLogger(__name__)


class SpawnLauncher(_MultiProcessingLauncher):
    def __init__(self, strategy: Any, subject_id: Optional[str], log_level: int, quiet: Callable[[], None]):
        super().__init__(strategy, start_method="spawn")
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.subject_id, self.log_level, self.quiet = subject_id, log_level, quiet
        self.stop = ctx.Event()  # the main process's SIGTERM, seen by every rank
        self.fence = ctx.Event()  # the main process lost the subject's lease: every rank stops (StoreCheckpoints)
        self.progress = ctx.SimpleQueue()  # (step, loss) from rank 0
        self.errors = Path(tempfile.mkdtemp(prefix="dbbatch-ddp-"))  # each failing rank pickles its exception here
        self.results: dict[str, Any] = {}

    # --- main process ----------------------------------------------------------------------------------
    def launch(self, function: Callable, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        stop_signals = (signal.SIGTERM, signal.SIGINT)  # SIGINT: `kill -INT` of this process alone reaches no rank
        previous = {signum: signal.getsignal(signum) for signum in stop_signals}

        def on_stop(signum: int, frame: Any) -> None:
            if callable(previous[signum]):
                previous[signum](signum, frame)  # dbbatch.core.signals: the worker exits 143 (130) afterwards
            self.stop.set()

        for signum in stop_signals:
            signal.signal(signum, on_stop)
        guards = [cb for cb in (trainer.callbacks if trainer is not None else ()) if hasattr(cb, "fence")]
        for cb in guards:
            cb.fence = self.fence  # pickled into the ranks with the trainer; the guard (the lease) is not
        done = threading.Event()  # local: the launcher itself is pickled into the ranks
        watcher = self._watch_lease([cb.guard for cb in guards if cb.guard is not None], done)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        finally:
            if watcher is not None:
                done.set()
                watcher.join(5)
            for signum in stop_signals:
                signal.signal(signum, previous[signum])

    def _watch_lease(self, guards: list[Callable[[str], None]], done: threading.Event) -> Optional[threading.Thread]:
        """A thread that checks the subject's lease (no I/O: its renewal thread keeps the state) every second
        until `done`, while the ranks train, and sets the fence when it is lost."""
        if not guards:
            return None

        def run() -> None:
            while not done.wait(1.0):
                try:
                    for guard in guards:
                        guard("training in DDP ranks")
                except Exception as e:  # noqa: BLE001 - LeaseLost: the message is the rank's to raise
                    log.error("%s; stopping the training processes", e)
                    self.fence.set()
                    return

        thread = threading.Thread(target=run, name="ddp-lease-fence", daemon=True)
        thread.start()
        return thread

    def relay_progress(self, task: Any) -> threading.Thread:
        """A thread feeding the reporter from rank 0's queue until `stop_relay`."""
        def run() -> None:
            while (item := self.progress.get()) is not None:
                task.set(item[0], loss=item[1])

        thread = threading.Thread(target=run, name="ddp-progress", daemon=True)
        thread.start()
        return thread

    def stop_relay(self, thread: threading.Thread) -> None:
        self.progress.put(None)
        thread.join(10)

    def rank_error(self) -> Optional[BaseException]:
        """The exception of the lowest failing rank, as it was raised there (None if no rank recorded one)."""
        for path in sorted(self.errors.glob("rank*.pkl")):
            try:
                return pickle.loads(path.read_bytes())  # written by our own ranks just now
            except Exception:  # noqa: BLE001 - an unpicklable exception: the generic error stands
                continue
        return None

    def cleanup(self) -> None:
        shutil.rmtree(self.errors, ignore_errors=True)

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        self.results = extra["dbbatch"]
        trainer.lightning_module.losses = list(self.results["losses"])
        for cb in trainer.callbacks:
            if hasattr(cb, "save_seconds"):
                cb.last_saved, cb.save_seconds, cb.sizes = self.results["checkpoints"]

    # --- ranks -----------------------------------------------------------------------------------------
    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        cbs = [cb for cb in trainer.callbacks if hasattr(cb, "save_seconds")]
        extra["dbbatch"] = {
            "global_step": trainer.global_step, "losses": list(trainer.lightning_module.losses),
            "checkpoints": (cbs[0].last_saved, cbs[0].save_seconds, cbs[0].sizes) if cbs else None,
        }
        return extra

    def _wrapping_function(self, process_idx: int, trainer: Optional[pl.Trainer], *rest: Any) -> None:
        # A spawned rank starts bare: no logging setup, signal handler or fault-injection subject.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {process_idx}] %(message)s", "%H:%M:%S"))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger("dbbatch").setLevel(self.log_level)
        self.quiet()
        signals.install()
        signals.watch(self.stop)
        faults.set_subject(self.subject_id)
        if trainer is not None:
            # Lightning 2.6's SIGTERM handler broadcasts from inside the handler (a collective at a random
            # point of the other ranks' work) and stops at the next micro-batch; preemption is ours instead:
            # StoreCheckpoints agrees on it across ranks at a step boundary.
            trainer._signal_connector.register_signal_handlers = lambda: None
        try:
            super()._wrapping_function(process_idx, trainer, *rest)
        except BaseException as e:
            try:
                (self.errors / f"rank{process_idx:03d}.pkl").write_bytes(pickle.dumps(e))
            except Exception:  # noqa: BLE001 - unpicklable: the main process reports the generic failure
                pass
            raise


class ProgressToMain(pl.Callback):
    """Rank 0 sends (step, loss) to the main process, whose reporter draws it."""

    def __init__(self, queue: Any):
        self.queue = queue

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:
            self.queue.put((trainer.global_step, pl_module.losses[-1] if pl_module.losses else float("nan")))


class SpawnDDP(DDPStrategy):
    """DDPStrategy whose ranks are spawned by SpawnLauncher (gloo on CPU, NCCL on GPUs: Lightning's choice)."""

    def __init__(self, subject_id: Optional[str], log_level: int, quiet: Callable[[], None]):
        super().__init__(start_method="spawn")
        self._dbbatch_args = (subject_id, log_level, quiet)

    def _configure_launcher(self) -> None:
        self._launcher = SpawnLauncher(self, *self._dbbatch_args)
