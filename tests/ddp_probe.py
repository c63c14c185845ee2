"""Run by tests/test_datamodule.py as `python tests/ddp_probe.py OUT DATASET WORKERS`: a 2-process
CPU DDP (gloo) fit + test that records which samples every rank saw at every step."""

import json
import sys

import lightning as L
import torch

from mindsemantix.data.datamodule import BrainDataModule


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": [], "val": [], "test": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append([self.current_epoch, batch_idx, batch["subject"], batch["key"]])
        return (self.weight * batch["fmri"].mean()).sum() ** 2

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append([self.current_epoch, batch_idx, batch["subject"], batch["key"]])
        self.log("val_metric", batch["fmri"].mean(), sync_dist=True, batch_size=len(batch["key"]))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append([self.current_epoch, batch_idx, batch["subject"], batch["key"]])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out, dataset, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dm = BrainDataModule(dataset, batch_size=4, eval_batch_size=4, num_workers=workers, seed=3)
    model = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"seen": model.seen, "global_step": trainer.global_step, "world_size": trainer.world_size}, f)
