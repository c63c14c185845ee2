"""Test helper (used through the CLI): kill the training process with a signal after a given step."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))
