"""Command line: `mindsemantix` (also installed as `lightning`).

    mindsemantix fit|validate|test|predict --config stages/<stage>.yaml [--overrides] [--debug]   (LightningCLI;
        errors are one line naming the cause, --debug or MINDSEMANTIX_DEBUG=1 shows the traceback;
        the stages: --model BrainMAE | BrainAlign | BrainReconstruct, their settings: --model.help BrainAlign)
    mindsemantix data inspect DIR [--no-checksums] [--deep]
    mindsemantix score-captions --predictions P.jsonl --references R.jsonl --out M.json
    mindsemantix score-images --predictions DIR --targets DIR --out M.json
    mindsemantix baselines --data DIR --out DIR [--diffusion SD]                       (chance and ridge baselines)
    mindsemantix report --out reports/<run> --predictions P.jsonl --baselines-dir DIR  (eval.json, eval.md, pictures)
    mindsemantix bundle --run runs/<run> --out DIR                                     (a shareable model)
    mindsemantix decode --model DIR --subject subj01 --betas FILE --out DIR            (new fMRI)
    mindsemantix adapt --model DIR --data SHARDS --subject NEW [--sessions 1] --out DIR  (a new subject)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

# Precision is measured per kind of work (mindsemantix/precision.py); re-exported for pipeline.py and recipes.
from mindsemantix.precision import BF16_ENV, auto_precision, bf16_is_fast, bf16_override  # noqa: F401

# Non-Lightning subcommands: name -> module with `main(argv) -> int`.
TOOLS = {
    "data": "mindsemantix.cli",
    "score-captions": "mindsemantix.eval.captions",
    "score-images": "mindsemantix.eval.images",
    "baselines": "mindsemantix.eval.baselines",
    "report": "mindsemantix.eval.report",
    "evaluate": "mindsemantix.eval.report",  # the report's earlier name
    "bundle": "mindsemantix.decode:bundle_main",
    "decode": "mindsemantix.decode:main",
    "adapt": "mindsemantix.decode:adapt_main",
}


# Messages that every run would print and that say nothing about this run, silenced by their text
# (anything else still shows): warnings, by the start of the message...
QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's pytree API change, inside Lightning
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen LLM / SD / vision encoder: on purpose
)
# ... and log records, by logger and a part of the message
QUIET_LOGS = {
    "lightning.pytorch.utilities.rank_zero": "💡 Tip:",  # Lightning's adverts for litlogger / litmodels
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",  # we pass tensors
}


class DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Silence QUIET_WARNINGS and QUIET_LOGS in this process (subprocesses of DDP inherit nothing: they
    run this entry point again). Also: an option that is only the start of a real one (`num_beam` for
    `num_beams`, in a nested setting too) is an error, not jsonargparse's deprecation warning."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("error", message=r"\s*Option '\S+' was expanded to")
    for name, text in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessage(text))


def data_main(argv: list[str]) -> int:
    from mindsemantix.data.shards import ShardError, inspect

    parser = argparse.ArgumentParser(prog="mindsemantix data", description="Shard dataset tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print subjects, voxel counts, samples per split; check the manifest")
    p.add_argument("dataset", help="shard dataset folder (with manifest.json)")
    p.add_argument("--no-checksums", action="store_true", help="check sizes only, not sha256")
    p.add_argument("--deep", action="store_true", help="also decode every sample: NaN/inf, zero repetitions, bad "
                                                       "PNGs/captions/keys, duplicate keys, test-set leaks (slow)")
    args = parser.parse_args(argv)
    try:
        if args.deep:
            return deep_inspect_main(args.dataset, checksums=not args.no_checksums)
        print("\n".join(inspect(args.dataset, checksums=not args.no_checksums)))
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def deep_inspect_main(dataset: str, checksums: bool, shown: int = 50) -> int:
    """`data inspect --deep`: print every problem (up to `shown`) and their count; exit 1 if any."""
    from mindsemantix.data.shards import deep_inspect

    n, problems = deep_inspect(dataset, checksums=checksums)
    for line in problems[:shown]:
        print(f"problem: {line}")
    if len(problems) > shown:
        print(f"... and {len(problems) - shown} more")
    print(f"deep check: {n} samples decoded, {len(problems)} problem(s)")
    return 1 if problems else 0


def add_run_csv_logger(cfg, subcommand: str | None) -> None:
    """The run folder always gets `metrics.csv` (what `curves.png` reads): the CSV logger is the
    default, and it is put first beside any logger the config names (TensorBoard, W&B, MLflow...),
    so `trainer.log_dir` (config.yaml, hparams) stays the run folder. `logger: false` logs nothing.
    fit logs to the run folder; validate/test/predict to <run>/<subcommand>, so they never
    overwrite the training curves or the training config.yaml."""
    given = cfg.trainer.logger
    if given is False:
        return
    save_dir = Path(cfg.trainer.default_root_dir or ".")
    if subcommand not in (None, "fit"):
        save_dir = save_dir / subcommand
    csv = {"class_path": "mindsemantix.callbacks.RunCSVLogger",
           "init_args": {"save_dir": str(save_dir), "name": "", "version": "",
                         "resume": subcommand == "fit" and bool(cfg.get("ckpt_path"))}}
    if given in (None, True):
        cfg.trainer.logger = csv
        return
    loggers = list(given) if isinstance(given, list) else [given]
    if not any(str(getattr(lg, "class_path", "")).endswith("RunCSVLogger") for lg in loggers):
        cfg.trainer.logger = [csv, *loggers]


def step_progress_bar():
    """Lightning's default (Rich) progress bar, whose epoch reads `Epoch 2/-2` when a run is limited
    by `max_steps` (max_epochs -1): there the last epoch is the one that reaches max_steps."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            trainer = self.trainer
            if trainer.max_epochs not in (None, -1) or trainer.max_steps < 0:
                return super()._get_train_description(current_epoch)
            per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
            last = math.ceil(trainer.max_steps / per_epoch) - 1 if 0 < per_epoch < math.inf else None
            text = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
            return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text

    return StepProgressBar()


def null_settings_to_defaults(model_cfg) -> None:
    """`null` for a typed setting of a stage (`encoder`, `generation`, `head`, ...: arguments whose
    default is a dataclass) means its defaults, as it did when they were dicts (configs and saved
    config.yaml files of earlier runs say `encoder: null`)."""
    import dataclasses
    import inspect

    init_args = model_cfg.get("init_args") if hasattr(model_cfg, "get") else None
    class_path = model_cfg.get("class_path") if hasattr(model_cfg, "get") else None
    if not init_args or not class_path:
        return
    module, _, name = class_path.rpartition(".")
    stage = getattr(importlib.import_module(module), name)
    for arg, param in inspect.signature(stage.__init__).parameters.items():
        if dataclasses.is_dataclass(param.default) and arg in init_args and init_args[arg] is None:
            del init_args[arg]


def lightning_cli(args: list[str] | None = None):
    from lightning.pytorch.cli import LightningCLI

    from mindsemantix.data.datamodule import BrainDataModule
    from mindsemantix.stages import align, pretrain, reconstruct  # noqa: F401 (the known stages: `--model BrainMAE`)
    from mindsemantix.stages.base import StageModule

    class MindSemantixCLI(LightningCLI):
        """`trainer.default_root_dir` is the run folder; what lives in it is derived from it after all
        overrides are applied: the CSV logger writes `<run>/metrics.csv` (and hparams), checkpoints
        go to `<run>/checkpoints` (ModelCheckpoint's default under that logger), the stage export to
        `<run>/export` (StageModule). Override only `--trainer.default_root_dir` to move a run."""

        def _parse_ckpt_path(self) -> None:
            """Resuming (`--ckpt_path`) restores the run from its checkpoint but keeps the model
            configuration you give: Lightning's default would overwrite it silently with the
            checkpoint's hyper-parameters (a known pitfall of earlier brain-decoding code). Differences are printed.
            `last` is the readable checkpoint of this run furthest into training (by the step recorded
            in it); corrupt ones are skipped with a warning, and if every one is corrupt the run stops
            with their names (starting over is explicit). A bad explicit path fails here likewise."""
            from mindsemantix.callbacks import load_checkpoint_safely, resolve_last_checkpoint

            if not self.config.get("subcommand"):
                return
            cfg = self.config[self.config.subcommand]
            ckpt_path = cfg.get("ckpt_path")
            if ckpt_path == "last":
                found = resolve_last_checkpoint(Path(cfg.trainer.default_root_dir or ".") / "checkpoints")
                print(f"resuming from {found}" if found else "--ckpt_path last: no checkpoint in this run yet; starting fresh")
                cfg.ckpt_path = ckpt_path = str(found) if found else None
            if not ckpt_path or ckpt_path in ("best", "hpc") or "://" in str(ckpt_path):
                return
            saved = load_checkpoint_safely(ckpt_path).get("hyper_parameters", {})
            given = cfg.model.get("init_args", {}) if hasattr(cfg.model, "get") else {}
            changed = {k: (saved[k], given[k]) for k in saved if k in given and saved[k] != given[k]
                       and not isinstance(saved[k], (dict, list))}
            for k, (old, new) in changed.items():
                print(f"note: resuming with model.init_args.{k}={new!r}; the checkpoint was trained with {old!r}")

        def instantiate_trainer(self, **kwargs):
            """Atomic checkpoint files unless the config names its own CheckpointIO. Added here, not as a
            trainer default: an instance in the defaults cannot be written to config.yaml, and the saved
            config must parse again (`fit --config <run>/config.yaml`)."""
            from lightning.fabric.plugins import CheckpointIO

            from mindsemantix.callbacks import AtomicCheckpointIO

            from lightning.pytorch.callbacks import ProgressBar
            from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

            trainer_config = self._get(self.config_init, "trainer", default={})
            given = trainer_config.get("plugins") or []
            given = list(given) if isinstance(given, (list, tuple)) else [given]
            if not any(isinstance(p, CheckpointIO) for p in given):
                kwargs["plugins"] = [*given, AtomicCheckpointIO()]
            # Lightning's default bar, with an epoch count that makes sense for a max_steps run
            callbacks = trainer_config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if (trainer_config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
                    and not any(isinstance(c, ProgressBar) for c in callbacks)):
                kwargs["callbacks"] = [*callbacks, step_progress_bar()]
            trainer = super().instantiate_trainer(**kwargs)
            # Checkpoints live in <run>/checkpoints whatever the loggers (Lightning would put them under
            # the first logger's folder), so `--ckpt_path last` and SLURM requeues always find them.
            for callback in trainer.checkpoint_callbacks:
                if callback.dirpath is None:
                    callback.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")
            return trainer

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if cfg.trainer.precision is None:
                cfg.trainer.precision = auto_precision(cfg.trainer.accelerator)
            null_settings_to_defaults(cfg.get("model"))
            add_run_csv_logger(cfg, self.subcommand)

    from mindsemantix.callbacks import DataSkipReport, Preemption

    return MindSemantixCLI(
        StageModule, BrainDataModule, subclass_mode_model=True,
        trainer_defaults={"callbacks": [Preemption(), DataSkipReport()]},
        seed_everything_default=0, save_config_kwargs={"overwrite": True}, args=args,
        parser_kwargs={"prog": "mindsemantix"},
    )


DEBUG_ENV = "MINDSEMANTIX_DEBUG"


def input_error_types() -> tuple[type[Exception], ...]:
    """Our errors about bad input: their message already names the file/option and the problem."""
    from mindsemantix.callbacks import CheckpointError
    from mindsemantix.data.shards import ShardError
    from mindsemantix.export import ExportError

    return CheckpointError, ShardError, ExportError


def root_cause(error: BaseException) -> BaseException:
    """What to report of an exception chain: the outermost of our input errors in it (they carry the
    message; what they wrap is detail), else the innermost exception — what jsonargparse's "Does not
    validate against any of the Union subtypes" or Lightning's re-raises wrap."""
    ours = input_error_types()
    seen = {id(error)}
    while not isinstance(error, ours):
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    return error


def one_line(error: BaseException, limit: int = 500) -> str:
    """`error` as one line: its own message for our input errors, else `Type: message`."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if not isinstance(error, input_error_types()):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + " ..."


def run_lightning(argv: list[str], from_console: bool = False) -> int:
    """LightningCLI with errors as one line naming the cause; `--debug` (or MINDSEMANTIX_DEBUG=1) for the traceback."""
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "off")
    argv = [a for a in argv if a != "--debug"]
    if from_console:  # LightningCLI reads sys.argv itself then (and warns when given both)
        sys.argv[1:] = argv
    try:
        lightning_cli(None if from_console else argv)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line unless debugging
        if debug:
            raise
        print(f"error: {one_line(root_cause(e))}  (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet()
    from_console = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        if argv[0] == "data":
            return data_main(argv[1:])
        module, _, function = TOOLS[argv[0]].partition(":")
        return int(getattr(importlib.import_module(module), function or "main")(argv[1:]) or 0)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
    return run_lightning(argv, from_console)


if __name__ == "__main__":
    sys.exit(main())
