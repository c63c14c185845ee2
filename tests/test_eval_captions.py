"""Caption scorer: equality with pycocoevalcap run directly, the fallbacks without Java, the ceiling,
SentenceSim / CLIP-S definitions and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mindsemantix.eval import captions as C

# Six images, five references each (COCO style, with punctuation, case and contractions the PTB
# tokenizer has to handle), and one prediction per image.
REFERENCES = {
    "subj01-000001": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean",
                      "a person on a surf board in the water", "Surfer in a black wetsuit catching a wave.",
                      "A man is surfing on a big, blue wave."],
    "subj01-000002": ["Two dogs playing with a frisbee in the grass.", "A couple of dogs running in a field.",
                      "dogs chase a flying disc on the lawn", "Two brown dogs aren't sitting still.",
                      "A pair of dogs play outside (in the park)."],
    "subj01-000003": ["A plate of food with broccoli and rice.", "Dinner plate with meat, rice and vegetables",
                      "a white plate topped with broccoli", "Food is served on a round plate.",
                      "A healthy meal of chicken and broccoli."],
    "subj01-000004": ["A red double decker bus on a city street.", "A bus driving down the road in London",
                      "the red bus is parked by the curb", "A large bus with people on the top deck.",
                      "Double-decker bus stopped at a bus stop."],
    "subj01-000005": ["A cat sleeping on a laptop keyboard.", "a cat lying on top of a computer",
                      "The kitten is napping on the keyboard.", "A grey cat rests on an open laptop",
                      "cat's asleep on someone's laptop"],
    "subj01-000006": ["A kitchen with white cabinets and a stove.", "an empty kitchen with a refrigerator",
                      "Kitchen counters, a sink and a window.", "A clean kitchen in a small apartment",
                      "white appliances in a modern kitchen"],
}
PREDICTIONS = {
    "subj01-000001": "a man riding a wave on a surfboard",
    "subj01-000002": "two dogs playing in a field of grass",
    "subj01-000003": "a plate of food with meat and vegetables",
    "subj01-000004": "a bus driving down a street",
    "subj01-000005": "a cat laying on a laptop computer",
    "subj01-000006": "a living room with a couch and a table",
}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH (pycocoevalcap's jars need it)")


@pytest.fixture(scope="module")
def meteor_jar():
    """One METEOR JVM for the module (its start is the slow part: the paraphrase table loads)."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    with C.JavaMeteor(timeout_s=300) as jar:
        yield jar
    assert jar.scorer.meteor_p.poll() is not None, "the METEOR JVM must be shut down"


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    """PATH without java (an empty folder), as on a machine without a JRE."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("java") is None


@needs_java
def test_equals_pycocoevalcap_run_directly(meteor_jar):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The coco-caption recipe (COCOEvalCap.evaluate): tokenise gts and res, then each scorer.
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
                "METEOR": meteor_jar.scorer.compute_score(gts, res)[0],  # pycocoevalcap's Meteor object itself
                "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}
    per_image = {"ROUGE-L": dict(zip(gts, Rouge().compute_score(gts, res)[1])),
                 "CIDEr": dict(zip(gts, Cider().compute_score(gts, res)[1]))}

    result = C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor=meteor_jar, spice="off")
    assert result["info"]["meteor_impl"] == "pycocoevalcap-1.5-java"
    assert "PTBTokenizer" in result["info"]["tokenizer_impl"]
    assert set(result["metrics"]) == set(expected)
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-9), name
    assert set(result["per_image"]) == set(per_image) and result["keys"] == sorted(PREDICTIONS)
    for name, by_key in per_image.items():  # per image, in `keys` order, as pycocoevalcap scores each
        assert result["per_image"][name] == pytest.approx([by_key[k] for k in result["keys"]], abs=1e-9), name
    # not a degenerate fixture: the metrics spread over their range
    assert 0.3 < result["metrics"]["BLEU-1"] < 0.9 and 0 < result["metrics"]["BLEU-4"] < result["metrics"]["BLEU-1"]
    assert result["metrics"]["CIDEr"] > 0.1


@needs_java
def test_prediction_order_and_key_names_do_not_matter(meteor_jar):
    base = C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor=meteor_jar, spice="off")
    renamed = {f"k{i}": k for i, k in enumerate(reversed(list(PREDICTIONS)))}
    other = C.score_captions({n: PREDICTIONS[k] for n, k in renamed.items()},
                             {n: REFERENCES[k] for n, k in renamed.items()},
                             sentence_encoder=None, meteor=meteor_jar, spice="off")
    for name, value in base["metrics"].items():
        assert other["metrics"][name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("impl", [pytest.param("java", marks=needs_java), "nltk"])
def test_one_tokenizer_run_for_several_scoring_runs(impl, monkeypatch):
    # The report tokenises every caption set (and the ceiling's) in one run: a caption's tokens
    # depend on that caption alone, so the numbers are those of a tokenizer run per scoring run.
    alone = {"model": C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="off", spice="off",
                                       tokenizer=impl),
             "ceiling": C.reference_ceiling(REFERENCES, sentence_encoder=None, meteor="off", spice="off",
                                            tokenizer=impl)}
    tokenizer = C.CaptionTokenizer(impl)
    tokenizer.prefetch([*PREDICTIONS.values(), *(r for refs in REFERENCES.values() for r in refs)])
    monkeypatch.setattr(C, "ptb_tokenize", lambda *a, **k: pytest.fail("tokenised again"))
    shared = {"model": C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="off", spice="off",
                                        tokenizer=tokenizer),
              "ceiling": C.reference_ceiling(REFERENCES, sentence_encoder=None, meteor="off", spice="off",
                                             tokenizer=tokenizer)}
    for name in alone:
        assert shared[name]["metrics"] == alone[name]["metrics"], name
        assert shared[name]["info"]["tokenizer_impl"] == alone[name]["info"]["tokenizer_impl"]


def test_memo_encoder_embeds_each_sentence_once():
    sentences = ["a long sentence of several words", "red car", "blue sky", "red car", "a dog"]
    enc = BagOfWords(sentences)
    calls = []
    counting = type("Counting", (), {"encode": lambda self, s: calls.append(list(s)) or enc.encode(s)})()
    memo = C.MemoEncoder(counting, source="bag of words")
    np.testing.assert_array_equal(memo.encode(sentences), enc.encode(sentences).numpy())
    np.testing.assert_array_equal(memo.encode(["blue sky", "a dog"]), enc.encode(["blue sky", "a dog"]).numpy())
    assert calls == [["a dog", "red car", "blue sky", "a long sentence of several words"]]  # distinct, shortest first
    preds, refs = {"a": "red car", "b": "blue sky"}, {"a": ["red car", "a dog"], "b": ["blue sky"]}
    result = C.score_captions(preds, refs, sentence_encoder=memo, meteor="off", spice="off", tokenizer="nltk")
    assert result["info"]["sentence_encoder"] == "bag of words" and result["metrics"]["SentenceSim"] == pytest.approx(1.0)


def test_without_java_tokenizer_and_meteor_fall_back(no_java):
    with pytest.raises(RuntimeError, match="java"):
        C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="java", spice="off")
    result = C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="auto", spice="auto")
    info, metrics = result["info"], result["metrics"]
    assert info["tokenizer_impl"].startswith("nltk")
    assert info["spice_impl"].startswith("unavailable")
    assert all(0 < metrics[k] <= 1 for k in C.BLEU_KEYS + ("ROUGE-L",))
    if C.nltk_wordnet_available():
        from nltk.translate.meteor_score import meteor_score

        assert info["meteor_impl"].startswith("nltk")
        toks = C.ptb_tokenize({**{("r", k): v for k, v in REFERENCES.items()},
                               **{("p", k): [v] for k, v in PREDICTIONS.items()}}, "nltk")
        expected = np.mean([meteor_score([r.split() for r in toks[("r", k)]], toks[("p", k)][0].split())
                            for k in REFERENCES])
        assert metrics["METEOR"] == pytest.approx(expected, abs=1e-12)
    else:  # no WordNet either: left out, and the report says why
        assert "METEOR" not in metrics
        assert "wordnet-base" in info["meteor_impl"]


def test_nltk_tokenizer_approximates_ptb():
    out = C.ptb_tokenize({"a": ["A man (in red) rides a horse.", "Two \"dogs\" aren't playing; wow...",
                                "line\nbreak\u2028inside"]}, "nltk")
    # Stanford's output for the same lines (lower-cased brackets survive coco's punctuation filter)
    assert out["a"] == ["a man -lrb- in red -rrb- rides a horse", "two dogs are n't playing wow", "line break inside"]


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="Debian wordnet-base not installed (apt-get install wordnet-base wordnet-sense-index)")
def test_prepare_wordnet_from_debian_files(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])  # nltk finds no wordnet
    target = C.prepare_nltk_wordnet(nltk_data=tmp_path / "nltk_data")
    assert target == tmp_path / "nltk_data" / "corpora" / "wordnet"
    lines = (target / "lexnames").read_text().splitlines()
    assert len(lines) == 45 and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"
    assert not (target / "lexnames").is_symlink() and (target / "index.sense").is_file()
    assert (target / "data.noun").stat().st_size == Path("/usr/share/wordnet/data.noun").stat().st_size
    assert str(tmp_path / "nltk_data") in nltk.data.path
    assert C.prepare_nltk_wordnet(nltk_data=tmp_path / "other") == target  # found now: nothing copied again
    assert not (tmp_path / "other").exists()
    # (that nltk's reader works on such a folder is shown by the METEOR fallback test above)


class BagOfWords:
    """A stand-in sentence encoder: normalised word counts over a fixed vocabulary."""

    def __init__(self, sentences):
        self.vocab = sorted({w for s in sentences for w in s.lower().split()})

    def encode(self, sentences):
        out = torch.zeros(len(sentences), len(self.vocab))
        for i, s in enumerate(sentences):
            for w in s.lower().split():
                out[i, self.vocab.index(w)] += 1
        return torch.nn.functional.normalize(out, dim=-1)


def test_sentence_sim_best_match_and_mean():
    preds = {"a": "red car", "b": "blue sky"}
    refs = {"a": ["red car", "green tree"], "b": ["blue sea", "grey sky", "dark night"]}
    enc = BagOfWords([*preds.values(), *(r for v in refs.values() for r in v)])
    assert C.sentence_similarity(preds, refs, enc, "best") == pytest.approx((1.0 + 0.5) / 2)
    assert C.sentence_similarity_per_image(preds, refs, enc, "best") == pytest.approx([1.0, 0.5])
    assert C.sentence_similarity(preds, refs, enc, "mean") == pytest.approx(((1.0 + 0.0) / 2 + (0.5 + 0.5 + 0) / 3) / 2)
    with pytest.raises(ValueError):
        C.sentence_similarity(preds, refs, enc, "median")


def test_sentence_sim_with_minilm(no_java):
    result = C.score_captions(PREDICTIONS, REFERENCES, meteor="off", spice="off")  # default: offline MiniLM
    assert result["info"]["sentence_encoder"] == C.DEFAULT_SENTENCE_ENCODER
    assert 0.4 < result["metrics"]["SentenceSim"] < 0.95
    same = C.score_captions({k: v[0] for k, v in REFERENCES.items()}, REFERENCES, meteor="off", spice="off")
    assert same["metrics"]["SentenceSim"] == pytest.approx(1.0, abs=1e-5)  # best match includes itself


def test_ceiling_scores_each_reference_against_the_others(no_java):
    refs = {"a": ["a dog on the grass", "a dog on the grass", "a dog on the grass"],
            "b": ["a cat on a mat", "a cat on a mat"], "c": ["single reference only"]}
    result = C.reference_ceiling(refs, sentence_encoder=None, meteor="off", spice="off")
    assert result["info"]["n_images"] == 5  # 3 + 2 held-out references; "c" cannot be scored
    assert result["metrics"]["BLEU-1"] == pytest.approx(1.0) and result["metrics"]["ROUGE-L"] == pytest.approx(1.0)
    varied = C.reference_ceiling(REFERENCES, sentence_encoder=None, meteor="off", spice="off")
    assert varied["info"]["n_images"] == 30 and 0 < varied["metrics"]["BLEU-4"] < varied["metrics"]["BLEU-1"] < 1
    with pytest.raises(C.CaptionInputError, match="at least 2"):
        C.reference_ceiling({"c": ["one"]}, sentence_encoder=None, meteor="off")


def _tiny_clip(folder: Path) -> Path:
    """A randomly initialised, tiny CLIP with the real CLIP BPE tokenizer, saved like a user's folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mindsemantix.models.pretrained import load_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    load_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_s_and_refclip_s_follow_clipscore(tmp_path, no_java):
    from mindsemantix.eval.feature_nets import load_clip

    folder = _tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = {k: rng.integers(0, 256, (3, 40, 48), dtype=np.uint8) for k in PREDICTIONS}
    result = C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="off", spice="off",
                              clip_path=folder, images=images)

    clip = load_clip(folder)  # independent computation of the CLIPScore formulas
    keys = sorted(PREDICTIONS)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    img = unit(clip.encode_images([C._to_pil(images[k]) for k in keys]))
    cand = unit(clip.encode_text(["A photo depicts " + PREDICTIONS[k] for k in keys]))
    clip_s = 2.5 * (img * cand).sum(-1).clamp_min(0)
    ref_part = torch.stack([(unit(clip.encode_text(["A photo depicts " + r for r in REFERENCES[k]])) @ cand[i]).max()
                            for i, k in enumerate(keys)]).clamp_min(0)
    refclip = 2 * clip_s * ref_part / (clip_s + ref_part)
    assert result["metrics"]["CLIP-S"] == pytest.approx(clip_s.mean().item(), abs=1e-5)
    assert result["metrics"]["RefCLIP-S"] == pytest.approx(refclip.nan_to_num(0).mean().item(), abs=1e-5)
    with pytest.raises(C.CaptionInputError, match="images"):
        C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="off", clip_path=folder)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_keys_on_either_side_are_named():
    refs = dict(REFERENCES)
    extra_ref = refs.pop("subj01-000006")
    with pytest.raises(C.CaptionInputError, match=r"1 predicted key\(s\) have no references: 'subj01-000006'"):
        C.check_caption_inputs(PREDICTIONS, refs)
    preds = {k: v for k, v in PREDICTIONS.items() if k != "subj01-000002"}
    with pytest.raises(C.CaptionInputError, match=r"reference key\(s\) have no prediction: 'subj01-000002'"):
        C.check_caption_inputs(preds, {**refs, "subj01-000006": extra_ref})


@pytest.mark.parametrize("preds, refs, message", [
    ({"a": "  "}, {"a": ["x"]}, "prediction for key 'a' is empty"),
    ({"a": "x"}, {"a": []}, "references for key 'a'"),
    ({"a": "x"}, {"a": ["ok", ""]}, "references for key 'a'"),
    ({"a": "x"}, {"a": "not a list"}, "references for key 'a'"),
    ({}, {}, "no predictions"),
])
def test_empty_captions_are_rejected(preds, refs, message):
    with pytest.raises(C.CaptionInputError, match=message):
        C.check_caption_inputs(preds, refs)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("lines, message", [
    (['{"key": "a", "caption": "x"}', '{"key": "b", "caption": '], r"P\.jsonl:2: not valid JSON"),
    (['["a", "x"]'], r"P\.jsonl:1: expected a JSON object"),
    (['{"caption": "x"}'], r"P\.jsonl:1: missing or non-string \"key\""),
    (['{"key": "a"}'], r"P\.jsonl:1: key 'a' has no string \"caption\""),
    (['{"key": "a", "caption": ""}'], r"P\.jsonl:1: key 'a' has an empty caption"),
    (['{"key": "a", "caption": "x"}', "", '{"key": "a", "caption": "y"}'], r"P\.jsonl:3: key 'a' appears twice"),
    ([""], r"P\.jsonl: no predictions"),
])
def test_malformed_prediction_lines_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(C.CaptionInputError, match=message):
        C.read_predictions_jsonl(_write(tmp_path / "P.jsonl", lines))


@pytest.mark.parametrize("lines, message", [
    (['{"key": "a", "captions": "x"}'], r"R\.jsonl:1: key 'a' needs \"captions\""),
    (['{"key": "a", "captions": ["x", 3]}'], r"R\.jsonl:1: key 'a' needs \"captions\""),
    (['{"key": "a", "captions": ["x", " "]}'], r"R\.jsonl:1: key 'a' has an empty reference"),
])
def test_malformed_reference_lines_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(C.CaptionInputError, match=message):
        C.read_references_jsonl(_write(tmp_path / "R.jsonl", lines))


def test_cli_writes_metrics_and_reports_errors(tmp_path, no_java, capsys):
    pred = _write(tmp_path / "P.jsonl", [json.dumps({"key": k, "caption": v}) for k, v in PREDICTIONS.items()])
    ref = _write(tmp_path / "R.jsonl", [json.dumps({"key": k, "captions": v}) for k, v in REFERENCES.items()])
    out = tmp_path / "out" / "M.json"
    argv = ["--predictions", str(pred), "--references", str(ref), "--out", str(out), "--sentence-encoder", "none",
            "--meteor", "off"]
    assert C.main(argv) == 0
    written = json.loads(out.read_text())
    direct = C.score_captions(PREDICTIONS, REFERENCES, sentence_encoder=None, meteor="off", spice="off")
    assert written["metrics"] == pytest.approx(direct["metrics"])
    assert written["info"]["tokenizer_impl"].startswith("nltk") and written["info"]["predictions"] == str(pred)
    assert not [p for p in out.parent.iterdir() if p.name != "M.json"]  # atomic write left no temp file

    bad = _write(tmp_path / "R2.jsonl", [json.dumps({"key": k, "captions": v}) for k, v in list(REFERENCES.items())[:5]])
    assert C.main(["--predictions", str(pred), "--references", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    assert "have no references: 'subj01-000006'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
