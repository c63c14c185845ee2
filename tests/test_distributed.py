"""Stage 1 under 2-process CPU DDP (gloo) through the real CLI: identical weights on both ranks,
equal step counts, one export written by rank 0 only, no hang on shards that split unevenly."""

from __future__ import annotations

import json

from helpers import REPO, run_cli

TINY_DDP = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp_find_unused_parameters_true
  precision: 32-true
  max_steps: 5
  val_check_interval: 3
  check_val_every_n_epoch: null
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 3}
model:
  init_args: {preset: tiny, encoder: null, warmup_steps: 1}
data:
  batch_size: 4
  num_workers: 0
"""


def test_ddp_stage1_ranks_agree_and_rank0_exports(tiny_dataset_factory, tmp_path):
    # 3 subjects x 7 images / batch 4 -> 6 batches of sizes 4/3 -> 3 steps per rank per epoch
    data = tiny_dataset_factory(subjects={"subj01": 40, "subj02": 35, "subj03": 50},
                                n_images={"train": 7, "val": 3}, captions=False, image_size=None, samples_per_shard=4)
    run, probes = tmp_path / "run", tmp_path / "probes"
    config = tmp_path / "ddp.yaml"
    config.write_text(TINY_DDP)
    proc = run_cli("fit", "--config", str(REPO / "stages/pretrain.yaml"), "--config", str(config),
                   f"--data.datasets=[{data}]", f"--trainer.default_root_dir={run}",
                   "--trainer.callbacks+=probe_callbacks.RecordWeights", f"--trainer.callbacks.out_dir={probes}")
    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 5
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    assert proc.stdout.count("export: wrote") == 1 and "(rank 0)" in proc.stdout
    assert (run / "export" / "model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # each subject's val batches reach one rank or the other; all three are still logged (a collective
    # per subject on every rank, in the same order: before, rank 0 logged only the subjects it saw)
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for s in ("subj01", "subj02", "subj03"):
        values = [float(r[f"val/masked_corr/{s}"]) for r in rows if r.get(f"val/masked_corr/{s}")]
        assert len(values) == 1 and -1 <= values[0] <= 1, (s, values)
