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


class RecordWeights(L.Callback):
    """Write every rank's weights digest and step count to `<dir>/rank<r>.json` at the end of fit."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        import hashlib
        import json

        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"digest": digest.hexdigest(), "global_step": trainer.global_step,
                       "world_size": trainer.world_size}, f)
