"""The CLI explains itself: the stages in `fit --help`, short class names, a description for every
stage argument, typed settings whose typos fail at parse time, the evaluation subcommands, and
runs that print none of the silenced third-party messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("mindsemantix.stages.pretrain.BrainMAE", "mindsemantix.stages.align.BrainAlign",
          "mindsemantix.stages.reconstruct.BrainReconstruct")


def test_fit_help_lists_the_stages():
    out = run_cli("fit", "--help").stdout
    model = out[out.index("\n  --model CONFIG"):]
    model = " ".join(model[:model.index("\n\n")].split())
    for stage in STAGES:
        assert stage in model


def test_short_class_name_parses():
    out = run_cli("fit", "--model", "BrainMAE", "--data.datasets", "x", "--print_config").stdout
    assert "class_path: mindsemantix.stages.pretrain.BrainMAE" in out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_argument_has_a_description(stage):
    out = run_cli("fit", "--model.help", stage).stdout
    blocks = re.split(r"\n  (?=--model\.)", out[out.index("Help for"):])[1:]
    undescribed = []
    for block in blocks:
        text = " ".join(block.split())
        name = text.split()[0]
        if name.endswith(".help"):
            continue
        # --model.x METAVAR description (type: ...)
        m = re.match(r"--\S+(?: (?:[A-Z_]+|\{[a-z,]+\}|\[ITEM,\.\.\.\]))? (.*?)\((?:required, )?type:", text)
        if not m or not m.group(1).strip():
            undescribed.append(name)
    assert blocks and not undescribed


def test_typed_settings_appear_in_the_stage_help():
    align = run_cli("fit", "--model.help", "BrainAlign").stdout
    for option in ("--model.generation.num_beams", "--model.generation.rerank_by", "--model.loss_weights.itc",
                   "--model.qformer.num_queries"):
        assert option in align
    assert "--model.encoder.depth" in run_cli("fit", "--model.help", "BrainMAE").stdout
    reconstruct = run_cli("fit", "--model.help", "BrainReconstruct").stdout
    assert "--model.head.hidden" in reconstruct and "--model.sampling.strength" in reconstruct


@pytest.mark.parametrize("args", [
    ["--model.init_args.generation.num_beam", "3"],             # a prefix of num_beams: no silent expansion
    ["--model.init_args.generation.beams", "3"],
    ["--model.init_args.loss_weights", "{itc: 1.0, lmm: 1.0}"],
])
def test_a_typo_in_a_nested_setting_fails_at_parse_time_naming_the_key(args):
    proc = run_cli("fit", "--config", str(ROOT / "stages/align.yaml"), *args, "--print_config", expect_rc=2)
    key = args[0].rsplit(".", 1)[-1] if not args[1].startswith("{") else "lmm"
    assert key in proc.stderr


def test_a_typo_in_a_yaml_setting_fails_at_parse_time(tmp_path):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("model:\n  init_args:\n    sampling: {num_inference_step: 4}\n")
    proc = run_cli("fit", "--config", str(ROOT / "stages/reconstruct.yaml"), "--config", str(overlay),
                   "--print_config", expect_rc=2)
    assert "num_inference_step" in proc.stderr


def test_null_typed_settings_of_earlier_configs_mean_the_defaults():
    from mindsemantix.cli import null_settings_to_defaults
    from jsonargparse import Namespace

    cfg = Namespace(class_path="mindsemantix.stages.pretrain.BrainMAE",
                    init_args=Namespace(encoder=None, preset="tiny", init_from=None))
    null_settings_to_defaults(cfg)
    assert "encoder" not in cfg.init_args and cfg.init_args.init_from is None  # only typed settings


def test_dict_settings_from_python_are_checked():
    from mindsemantix.stages.pretrain import BrainMAE

    with pytest.raises(ValueError, match=r"encoder: unknown setting\(s\) \['dept'\]"):
        BrainMAE(encoder={"dept": 2})
    assert BrainMAE(encoder={"depth": 3}).config.depth == 3


def test_encoder_overrides_cover_every_encoder_field():
    from dataclasses import fields

    from mindsemantix.models.brain_encoder import BrainEncoderConfig, BrainEncoderOverrides

    assert [f.name for f in fields(BrainEncoderOverrides)] == [f.name for f in fields(BrainEncoderConfig)]


@pytest.mark.parametrize("tool", ["baselines", "report"])
def test_evaluation_subcommands_explain_themselves(tool):
    out = run_cli(tool, "--help").stdout
    assert "--out" in out and "usage:" in out


SILENCED = ("💡 Tip", "litlogger", "litmodels", "LeafSpec", "module(s) in eval mode", "torch_dtype",
            "requires torchvision", "/-2")


def test_a_tiny_fit_prints_none_of_the_silenced_messages(tiny_dataset_factory, tmp_path):
    """Stage 3 (SD loading, frozen modules in eval mode) with Lightning's progress bar."""
    from conftest import make_tiny_dataset
    from helpers import write_tiny_exports

    data = make_tiny_dataset(tmp_path / "data", n_images={"train": 8, "val": 4, "test": 4}, image_size=16)
    exports = write_tiny_exports(tmp_path, data)
    proc = run_cli("fit", "--config", str(ROOT / "stages/reconstruct.yaml"), "--config",
                   str(ROOT / "stages/tiny/reconstruct.yaml"), "--trainer.precision=32-true",
                   f"--data.datasets={data}", "--data.batch_size=4", "--trainer.max_steps=3",
                   "--trainer.val_check_interval=2", f"--model.init_args.align_export={exports['align']}",
                   f"--model.init_args.diffusion={exports['sd']}", "--model.init_args.head={token_dim: 8, hidden: 16}",
                   f"--trainer.default_root_dir={tmp_path / 'run'}")
    printed = proc.stdout + proc.stderr
    assert "Epoch 0/" in printed                                        # the progress bar ran
    assert [s for s in SILENCED if s in printed] == []
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["head"]["hidden"] == 16
