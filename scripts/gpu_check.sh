#!/usr/bin/env bash
# One GPU check, at most ~10 minutes, for a machine with one NVIDIA GPU (never run in CI):
#   1. every stages/cluster/*.yaml on the tiny local stand-ins of its hub models (tests/cluster_standins.py),
#      with the config's own precision (bf16-mixed; stage 3's SD in fp16 under autocast), on 1 GPU,
#      3 training steps, then predict for stages 2 and 3; stage 1 keeps its `large` preset (bf16 SDPA
#      attention = the flash kernel). Phase 2 runs with the LoRA setting align.yaml suggests.
#   2. the brain-encoder benchmark, briefly (benchmarks/bench_brain_encoder.py --device cuda).
# Prints a table: step | exit code | seconds. Logs and runs go to $OUT (default: $TMPDIR/mindsemantix_gpu_check).
#   bash scripts/gpu_check.sh            (after `make install`; PY=path/to/python to use another)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-${TMPDIR:-/tmp}/mindsemantix_gpu_check}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA GPU'; print('gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1

timeout 480 "$PY" - "$OUT" <<'PYEOF'
import subprocess, sys, time
from pathlib import Path

sys.path[:0] = ["tests", "."]
import yaml

from cluster_standins import make_cluster_inputs
from test_cluster_configs import LORA, standin_config

out = Path(sys.argv[1]).resolve()
paths = make_cluster_inputs(out)
gpu = {"accelerator": "gpu", "devices": 1}
rows = []


def step(label, name, subcommand="fit", *extra, **model):
    cfg = standin_config(name, paths, **model)
    cfg["trainer"].update(gpu)
    if name == "pretrain.yaml":
        cfg["model"]["init_args"]["preset"] = "large"  # as written: the GPU runs the real size
    path = out / f"{label}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.time()
    with open(out / f"{label}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "mindsemantix.cli", subcommand, "--config", str(path), *extra],
                             stdout=log, stderr=subprocess.STDOUT)
    rows.append((label, rc, time.time() - start))
    print(f"{label}: exit {rc}", flush=True)


runs = out / "runs"
step("pretrain-fit", "pretrain.yaml")
step("align_representation-fit", "align_representation.yaml")
step("align-lora-fit", "align.yaml", lora=LORA)
step("align-predict", "align.yaml", "predict", "--model.init_args.init_from", str(runs / "align" / "export"), lora=LORA)  # align.yaml lists CaptionWriter
step("reconstruct-fit", "reconstruct.yaml")
step("reconstruct-predict", "reconstruct.yaml", "predict", "--model.init_args.init_from",
     str(runs / "reconstruct" / "export"))
(out / "table.txt").write_text("".join(f"| {l} | {rc} | {s:.1f} |\n" for l, rc, s in rows))
PYEOF
start=$(date +%s)
timeout 90 "$PY" benchmarks/bench_brain_encoder.py --device cuda --steps 3 --warmup 1 --no-reference \
    > "$OUT/bench.log" 2>&1
echo "| bench_brain_encoder | $? | $(( $(date +%s) - start )) |" >> "$OUT/table.txt"
echo "| step | exit code | seconds |"
echo "|---|---:|---:|"
cat "$OUT/table.txt"
tail -n 15 "$OUT/bench.log"
