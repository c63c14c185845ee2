"""Caption metrics with the BrainHub protocol (docs/formats.md, report files): `score_captions`, the
reference ceiling, JSONL readers and the `mindsemantix score-captions` command.

Definitions (docs/eval.md has the long form):
- PTB tokenisation (Stanford CoreNLP 3.4.1 PTBTokenizer, lower-cased, punctuation tokens removed)
  and BLEU-1..4 (corpus level, "closest" reference length), METEOR 1.5 (the jar's corpus score),
  ROUGE-L (beta 1.2, mean over images) and CIDEr (CIDEr-D as in coco-caption: n 1..4, sigma 6,
  IDF over this set's references) are computed by pycocoevalcap itself, all references per image,
  so the numbers are pycocoevalcap's.
- Without Java: tokenisation falls back to nltk's Treebank tokenizer (an approximation of the PTB
  tokenizer) and METEOR to nltk's `meteor_score` (WordNet from Debian's `wordnet-base` and
  `wordnet-sense-index`), mean over images. `info` says which implementation produced each number.
- SentenceSim: all-MiniLM-L6-v2 cosine between prediction and references, best match over the
  references (BrainHub), then mean over images; `sentence_sim="mean"` averages over references.
- CLIP-S / RefCLIP-S (Hessel et al. 2021): w = 2.5, text prefix "A photo depicts",
  CLIP-S = w * max(cos(image, caption), 0); RefCLIP-S = harmonic mean of CLIP-S and
  max(max_r cos(caption, r), 0); only with CLIP weights (`clip_path`) and the seen images.
- SPICE: pycocoevalcap's SPICE 1.0 where its Stanford CoreNLP 3.6.0 jars are present (it would
  download them otherwise; we never let it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mindsemantix.io import write_json_atomic

log = logging.getLogger(__name__)

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
CORE_KEYS = BLEU_KEYS + ("METEOR", "ROUGE-L", "CIDEr", "SentenceSim")
OPTIONAL_KEYS = ("SPICE", "CLIP-S", "RefCLIP-S")
CLIPSCORE_W = 2.5
CLIPSCORE_PREFIX = "A photo depicts "
DEFAULT_SENTENCE_ENCODER = "offline:all-minilm-l6-v2"

# Characters Python (and the Java tokenizer) treat as line breaks: a caption containing one would
# shift every later line of the one-caption-per-line PTB tokenizer input, silently pairing
# captions with the wrong images. pycocoevalcap only replaces "\n".
_LINE_BREAKS = {ord(c): " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class CaptionInputError(ValueError):
    """Bad caption input; the message names the file/line or key and the problem."""


# ---------------------------------------------------------------------------------------------
# Input: JSONL readers and checks


def _read_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise CaptionInputError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CaptionInputError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise CaptionInputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            key = obj.get("key")
            if not isinstance(key, str) or not key:
                raise CaptionInputError(f"{path}:{lineno}: missing or non-string \"key\"")
            yield lineno, obj


def read_predictions_jsonl(path: str | os.PathLike) -> dict[str, str]:
    """Lines `{"key": str, "caption": str}` -> {key: caption}."""
    out: dict[str, str] = {}
    for lineno, obj in _read_jsonl(path):
        key, caption = obj["key"], obj.get("caption")
        if not isinstance(caption, str):
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} has no string \"caption\"")
        if not caption.strip():
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} has an empty caption")
        if key in out:
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} appears twice")
        out[key] = caption
    if not out:
        raise CaptionInputError(f"{path}: no predictions in the file")
    return out


def read_references_jsonl(path: str | os.PathLike) -> dict[str, list[str]]:
    """Lines `{"key": str, "captions": [str, ...]}` -> {key: [captions]}."""
    out: dict[str, list[str]] = {}
    for lineno, obj in _read_jsonl(path):
        key, captions = obj["key"], obj.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} needs \"captions\": a non-empty list of strings")
        if not all(c.strip() for c in captions):
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} has an empty reference caption")
        if key in out:
            raise CaptionInputError(f"{path}:{lineno}: key {key!r} appears twice")
        out[key] = list(captions)
    if not out:
        raise CaptionInputError(f"{path}: no references in the file")
    return out


def check_caption_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Same keys on both sides, non-empty strings everywhere; raises CaptionInputError naming keys."""
    if not predictions:
        raise CaptionInputError("no predictions given")
    only_pred = sorted(set(predictions) - set(references))
    only_ref = sorted(set(references) - set(predictions))
    if only_pred or only_ref:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} predicted key(s) have no references: {_few(only_pred)}")
        if only_ref:
            parts.append(f"{len(only_ref)} reference key(s) have no prediction: {_few(only_ref)}")
        raise CaptionInputError("; ".join(parts))
    for key, caption in predictions.items():
        if not isinstance(caption, str) or not caption.strip():
            raise CaptionInputError(f"prediction for key {key!r} is empty or not a string")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise CaptionInputError(f"references for key {key!r} must be a non-empty list of non-empty strings")


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Which implementations are available


def _coco_dir() -> Path:
    import pycocoevalcap  # a namespace package: no __file__

    return Path(list(pycocoevalcap.__path__)[0])


def java_available() -> str | None:
    """Path of the `java` launcher on PATH (what pycocoevalcap spawns), or None."""
    return shutil.which("java")


def spice_available() -> bool:
    """SPICE needs Java and the Stanford CoreNLP 3.6.0 jars that pycocoevalcap would download."""
    lib = _coco_dir() / "spice" / "lib"
    return bool(java_available()) and (lib / "stanford-corenlp-3.6.0.jar").is_file() and \
        (lib / "stanford-corenlp-3.6.0-models.jar").is_file()


# The 45 WordNet 3.0 lexicographer files, in file-number order (the table of lexnames(5WN)). Debian's
# wordnet-base ships the database without the `lexnames` file that nltk's reader opens first.
_WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def prepare_nltk_wordnet(wordnet_dir: str | os.PathLike = "/usr/share/wordnet",
                         nltk_data: str | os.PathLike | None = None) -> Path | None:
    """Make nltk's WordNet corpus reader work from Debian's WordNet files; return its folder or None.

    If nltk already finds `corpora/wordnet`, nothing is written. Otherwise the database files of
    `wordnet_dir` (apt-get install wordnet-base wordnet-sense-index) are copied — not linked: nltk
    checks real files — into `<nltk_data>/corpora/wordnet/` with a generated `lexnames`, where
    `nltk_data` defaults to the first entry of $NLTK_DATA, else `$MINDSEMANTIX_CACHE/nltk_data`
    (~/.cache/mindsemantix/nltk_data); that root is added to `nltk.data.path`.
    """
    import nltk

    try:
        return Path(str(nltk.data.find("corpora/wordnet")))
    except LookupError:
        pass
    source = Path(wordnet_dir)
    if not (source / "data.noun").is_file():
        return None
    if nltk_data is None:
        env = os.environ.get("NLTK_DATA", "").split(os.pathsep)[0]
        cache = Path(os.environ.get("MINDSEMANTIX_CACHE", Path.home() / ".cache" / "mindsemantix"))
        nltk_data = env or cache / "nltk_data"
    target = Path(nltk_data) / "corpora" / "wordnet"
    if not (target / "lexnames").is_file():
        tmp = target.with_name(f".wordnet.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in source.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        (tmp / "lexnames").write_text("".join(
            f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_WORDNET_LEXNAMES)))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.append(str(nltk_data))
    return target


def nltk_wordnet_available() -> bool:
    try:
        return prepare_nltk_wordnet() is not None
    except OSError as e:
        log.warning("could not prepare WordNet for nltk: %s", e)
        return False


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _coco_punctuation() -> set[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return set(PUNCTUATIONS)


# Stanford's PTBTokenizer writes brackets as -LRB- etc.; with -lowerCase they become "-lrb-", which
# coco-caption's punctuation list (upper case) does not remove, so they stay as tokens.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokenize(captions: Mapping[Any, Sequence[str]], impl: str) -> dict[Any, list[str]]:
    """{id: [caption, ...]} -> {id: [tokenised caption, ...]} (lower case, punctuation dropped).

    impl "java": pycocoevalcap's PTBTokenizer (one JVM for all captions). impl "nltk": nltk's
    TreebankWordTokenizer on the lower-cased text with the same punctuation list and brackets
    spelled as Stanford's — an approximation used only where Java is missing.
    """
    clean = {k: [c.translate(_LINE_BREAKS) for c in caps] for k, caps in captions.items()}
    if impl == "java":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in clean.items()})
    elif impl == "nltk":
        from nltk.tokenize import TreebankWordTokenizer

        tok, punct = TreebankWordTokenizer(), _coco_punctuation()
        out = {k: [" ".join(_BRACKETS.get(t, t) for t in tok.tokenize(c.lower()) if t not in punct) for c in caps]
               for k, caps in clean.items()}
    else:
        raise ValueError(f"unknown tokenizer {impl!r} (java or nltk)")
    for k, caps in clean.items():  # the Java tokenizer pairs lines by position: verify nothing shifted
        if len(out.get(k, [])) != len(caps):
            raise RuntimeError(f"PTB tokenizer returned {len(out.get(k, []))} captions for {k!r}, expected {len(caps)}")
    return out


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """"auto" -> "java" where `java` is on PATH, else "nltk"; "java" without java raises."""
    if tokenizer not in ("auto", "java", "nltk"):
        raise ValueError(f"unknown tokenizer {tokenizer!r} (auto, java or nltk)")
    impl = tokenizer if tokenizer != "auto" else ("java" if java_available() else "nltk")
    if impl == "java" and not java_available():
        raise RuntimeError("tokenizer='java' but no `java` on PATH")
    return impl


class CaptionTokenizer:
    """`ptb_tokenize` memoised per caption, so that several scoring runs (model, baselines, ceiling)
    share one tokenizer run: each Java run costs a JVM start. `prefetch` every caption first, then
    `tokenize` finds them all in the memo.

    A caption's tokens depend on that caption alone (the PTB tokenizer reads one caption per line,
    `-preserveLines`), so tokenising captions together or apart gives the same tokens.
    """

    def __init__(self, tokenizer: str = "auto"):
        self.impl = resolve_tokenizer(tokenizer)
        self._memo: dict[str, str] = {}

    def prefetch(self, captions: Iterable[str]) -> None:
        """Tokenise the captions not seen yet, in one run."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if todo:
            out = ptb_tokenize({i: [c] for i, c in enumerate(todo)}, self.impl)
            self._memo.update((c, out[i][0]) for i, c in enumerate(todo))

    def tokenize(self, captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
        """Same as `ptb_tokenize(captions, impl)`."""
        self.prefetch(c for caps in captions.values() for c in caps)
        return {k: [self._memo[c] for c in caps] for k, caps in captions.items()}


# ---------------------------------------------------------------------------------------------
# METEOR


class JavaMeteor:
    """One METEOR 1.5 JVM (pycocoevalcap's `Meteor`, jar + paraphrase tables) for several scoring runs.

    Starting it costs seconds to tens of seconds (the paraphrase table loads), so a report that scores
    the model, the baselines and the ceiling shares one. Always shut down: use it as a context
    manager or call `close()`; a watchdog kills a JVM that does not answer within `timeout_s`
    (pycocoevalcap then reads EOF and we raise, instead of hanging on a wedged JVM).
    """

    impl = "pycocoevalcap-1.5-java"

    def __init__(self, timeout_s: float = 600.0):
        if not java_available():
            raise RuntimeError("METEOR 1.5 needs `java` on PATH (Debian: apt-get install default-jre-headless)")
        from pycocoevalcap.meteor.meteor import Meteor

        self.timeout_s = timeout_s
        self.scorer = Meteor()

    def score(self, gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> float:
        """Corpus METEOR of tokenised {id: [hypothesis]} against {id: [references]}."""
        proc = self.scorer.meteor_p
        if proc.poll() is not None:
            raise RuntimeError("the METEOR JVM is not running (closed, crashed or killed by the watchdog)")
        watchdog = threading.Timer(self.timeout_s, proc.kill)
        watchdog.daemon = True
        watchdog.start()
        # "|||" separates fields of the jar's protocol; pycocoevalcap strips it from hypotheses only
        gts = {k: [r.replace("|||", " ") for r in refs] for k, refs in gts.items()}
        try:
            score, _ = self.scorer.compute_score(gts, dict(res))
        except (ValueError, BrokenPipeError, OSError) as e:
            if self.scorer.lock.locked():  # compute_score died holding it; Meteor.__del__ would block
                self.scorer.lock.release()
            stderr = ""
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"METEOR (java) failed or timed out after {self.timeout_s:.0f}s: {e} {stderr}") from e
        finally:
            watchdog.cancel()
        return float(score)

    def close(self) -> None:
        proc = self.scorer.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def __enter__(self) -> "JavaMeteor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nltk_meteor(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> float:
    """nltk's METEOR (max over references per image), mean over images, on PTB-tokenised text."""
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split() for r in gts[k]], res[k][0].split()) for k in gts]
    return float(np.mean(scores))


def _resolve_meteor(meteor: str) -> tuple[str, str]:
    """-> (implementation, reason); implementation in java / nltk / none."""
    if meteor not in ("auto", "java", "nltk", "off"):
        raise ValueError(f"meteor must be auto, java, nltk or off, got {meteor!r}")
    if meteor == "off":
        return "none", "turned off"
    if meteor in ("auto", "java") and java_available():
        return "java", "java on PATH"
    if meteor == "java":
        raise RuntimeError("meteor='java' but no `java` on PATH (Debian: apt-get install default-jre-headless)")
    if nltk_wordnet_available():
        return "nltk", "no java on PATH" if meteor == "auto" else "asked for nltk"
    reason = ("nltk METEOR needs WordNet: apt-get install wordnet-base wordnet-sense-index "
              "(or put nltk's wordnet corpus on NLTK_DATA)")
    if meteor == "nltk":
        raise RuntimeError(reason)
    return "none", "no java on PATH and " + reason


# ---------------------------------------------------------------------------------------------
# Embedding metrics


class MemoEncoder:
    """A sentence encoder that embeds each distinct sentence once (`encode` as the wrapped encoder's,
    as an array): the references recur in every scoring run of a report (and as the ceiling's
    predictions), and the baselines' ridge targets and retrieval pool are the same captions.

    New sentences are embedded in order of length (in tokens where the encoder has a `tokenizer`),
    so that a batch pads its sentences to about the same length: padding is masked out (the
    embeddings are the same up to float rounding, ~1e-7) and would be a third of the cost.
    """

    def __init__(self, encoder, source: str | None = None):
        self.encoder, self.source = encoder, source or type(encoder).__name__
        self._memo: dict[str, np.ndarray] = {}

    def _by_length(self, sentences: list[str]) -> list[str]:
        tokenizer = getattr(self.encoder, "tokenizer", None)
        if callable(tokenizer):
            lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
        else:
            lengths = [len(s) for s in sentences]
        return [s for _, s in sorted(zip(lengths, sentences), key=lambda pair: pair[0])]

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        todo = [s for s in dict.fromkeys(sentences) if s not in self._memo]
        if todo:
            todo = self._by_length(todo)
            self._memo.update(zip(todo, np.asarray(self.encoder.encode(todo))))
        return np.stack([self._memo[s] for s in sentences])


def sentence_similarity(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], encoder,
                        reduce: str = "best") -> float:
    """Mean over images of the cosine between the prediction's and the references' embeddings,
    reduced over references by max ("best": BrainHub's SentenceScore) or mean ("mean")."""
    return float(np.mean(sentence_similarity_per_image(predictions, references, encoder, reduce)))


def sentence_similarity_per_image(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], encoder,
                                  reduce: str = "best") -> np.ndarray:
    """(N,) per image in the order of `predictions`: see `sentence_similarity`."""
    if reduce not in ("best", "mean"):
        raise ValueError(f"sentence_sim must be 'best' or 'mean', got {reduce!r}")
    keys = list(predictions)
    flat_refs = [r for k in keys for r in references[k]]
    pred_emb = _unit(np.asarray(encoder.encode([predictions[k] for k in keys]), dtype=np.float64))  # (N, D)
    ref_emb = _unit(np.asarray(encoder.encode(flat_refs), dtype=np.float64))  # (sum R_k, D)
    per_image, start = [], 0
    for i, k in enumerate(keys):
        sims = ref_emb[start:start + len(references[k])] @ pred_emb[i]
        start += len(references[k])
        per_image.append(sims.max() if reduce == "best" else sims.mean())
    return np.asarray(per_image, dtype=np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def clip_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                images: Mapping[str, Any], clip) -> tuple[float, float]:
    """(CLIP-S, RefCLIP-S), means over images, CLIPScore definitions (w 2.5, "A photo depicts")."""
    keys = list(predictions)
    missing = [k for k in keys if k not in images]
    if missing:
        raise CaptionInputError(f"CLIP-S needs the seen image of every key; missing: {_few(missing)}")
    img = _unit(clip.encode_images([_to_pil(images[k]) for k in keys]).double().numpy())  # (N, D)
    cand = _unit(clip.encode_text([CLIPSCORE_PREFIX + predictions[k] for k in keys]).double().numpy())
    flat_refs = [CLIPSCORE_PREFIX + r for k in keys for r in references[k]]
    refs = _unit(clip.encode_text(flat_refs).double().numpy())
    clip_s = CLIPSCORE_W * np.clip((img * cand).sum(1), 0, None)  # (N,)
    ref_part, start = np.empty(len(keys)), 0
    for i, k in enumerate(keys):
        ref_part[i] = max(float((refs[start:start + len(references[k])] @ cand[i]).max()), 0.0)
        start += len(references[k])
    denom = clip_s + ref_part
    refclip_s = np.where(denom > 0, 2 * clip_s * ref_part / np.where(denom > 0, denom, 1), 0.0)
    return float(clip_s.mean()), float(refclip_s.mean())


def _to_pil(image):
    """uint8 (3,H,W) / (H,W,3) array or tensor, or PIL image -> PIL RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise CaptionInputError(f"image must be uint8 RGB, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------------
# The scorer


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   sentence_encoder: Any = DEFAULT_SENTENCE_ENCODER, sentence_sim: str = "best",
                   clip_path: str | os.PathLike | None = None, images: Mapping[str, Any] | None = None,
                   meteor: str | JavaMeteor = "auto", spice: str = "auto", tokenizer: str | CaptionTokenizer = "auto",
                   meteor_timeout_s: float = 600.0) -> dict[str, Any]:
    """Score predicted captions against references (all references per key).

    predictions: {key: caption}; references: {key: [caption, ...]}, the same keys.
    sentence_encoder: a name/path for `load_sentence_encoder`, an object with `.encode(list[str])`
      -> (N, D) (a `MemoEncoder` to share embeddings across calls), or None to skip SentenceSim.
    clip_path + images ({key: seen image}) add CLIP-S and RefCLIP-S.
    meteor: "auto" (Java jar if `java` is on PATH, else nltk with WordNet, else left out),
      "java", "nltk", "off", or an open `JavaMeteor` to reuse one JVM across calls. spice: "auto" (if its jars are present), "on", "off".
    tokenizer: "auto" (PTB via Java if available, else nltk Treebank), "java", "nltk", or a
      `CaptionTokenizer` to share one tokenizer run across calls.

    Returns {"metrics": {metric name (docs/formats.md): float}, "info": {implementations, counts, settings}, "keys": sorted
    keys, "per_image": {metric: [value per key]}} for ROUGE-L, CIDEr and SentenceSim (means over images).
    """
    check_caption_inputs(predictions, references)
    keys = sorted(predictions)
    info: dict[str, Any] = {"n_images": len(keys), "n_references": sum(len(references[k]) for k in keys)}
    metrics: dict[str, float] = {}

    if not isinstance(tokenizer, CaptionTokenizer):
        tokenizer = CaptionTokenizer(tokenizer)
    tok_impl = tokenizer.impl
    tokenised = tokenizer.tokenize({**{("ref", k): list(references[k]) for k in keys},
                                    **{("pred", k): [predictions[k]] for k in keys}})
    gts = {k: tokenised[("ref", k)] for k in keys}
    res = {k: tokenised[("pred", k)] for k in keys}
    info["tokenizer_impl"] = ("pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, java)" if tok_impl == "java"
                              else "nltk TreebankWordTokenizer (approximates PTB; no java)")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({name: float(v) for name, v in zip(BLEU_KEYS, bleu)})

    if isinstance(meteor, JavaMeteor):  # a shared JVM: the caller closes it
        meteor_impl, meteor_reason = "shared", "a JavaMeteor was passed"
        metrics["METEOR"] = meteor.score(gts, res)
        info["meteor_impl"] = JavaMeteor.impl
    else:
        meteor_impl, meteor_reason = _resolve_meteor(meteor)
    if meteor_impl == "java":
        with JavaMeteor(meteor_timeout_s) as jar:
            metrics["METEOR"] = jar.score(gts, res)
        info["meteor_impl"] = JavaMeteor.impl
    elif meteor_impl == "nltk":
        metrics["METEOR"] = _nltk_meteor(gts, res)
        info["meteor_impl"] = "nltk-meteor_score (WordNet; not comparable to METEOR 1.5)"
        log.warning("METEOR from nltk (%s): not the METEOR 1.5 jar; numbers differ from published ones", meteor_reason)
    elif meteor_impl == "none":
        info["meteor_impl"] = f"unavailable: {meteor_reason}"
        log.warning("METEOR left out: %s", meteor_reason)

    # Per image, in `keys` order, for the metrics that are means over images (pycocoevalcap's ROUGE-L and
    # CIDEr-D iterate `gts` in insertion order); BLEU and METEOR are corpus-level statistics.
    per_image: dict[str, np.ndarray] = {}
    metrics["ROUGE-L"], per_image["ROUGE-L"] = Rouge().compute_score(gts, res)
    metrics["CIDEr"], per_image["CIDEr"] = Cider().compute_score(gts, res)

    if sentence_encoder is not None:
        if isinstance(sentence_encoder, (str, os.PathLike)):
            from mindsemantix.models.pretrained import load_sentence_encoder

            info["sentence_encoder"] = str(sentence_encoder)
            sentence_encoder = load_sentence_encoder(str(sentence_encoder))
        elif isinstance(sentence_encoder, MemoEncoder):
            info["sentence_encoder"] = sentence_encoder.source
        else:
            info["sentence_encoder"] = type(sentence_encoder).__name__
        per_image["SentenceSim"] = sentence_similarity_per_image({k: predictions[k] for k in keys}, references,
                                                                 sentence_encoder, sentence_sim)
        metrics["SentenceSim"] = per_image["SentenceSim"].mean()
        info["sentence_sim"] = {"best": "max over references, mean over images (BrainHub)",
                                "mean": "mean over references, mean over images"}[sentence_sim]

    if spice not in ("auto", "on", "off"):
        raise ValueError(f"spice must be auto, on or off, got {spice!r}")
    if spice == "on" or (spice == "auto" and spice_available()):
        if not spice_available():
            raise RuntimeError("spice='on' but SPICE needs java and pycocoevalcap/spice/lib/stanford-corenlp-3.6.0"
                               "{,-models}.jar (pycocoevalcap would download them; put them there by hand)")
        from pycocoevalcap.spice.spice import Spice

        try:
            metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
            info["spice_impl"] = "pycocoevalcap SPICE-1.0 (java)"
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            if spice == "on":
                raise
            info["spice_impl"] = f"failed: {e}"
    else:
        info["spice_impl"] = "off" if spice == "off" else "unavailable: needs java + Stanford CoreNLP 3.6.0 jars"

    if clip_path is not None:
        if images is None:
            raise CaptionInputError("clip_path given but no images: CLIP-S compares captions with the seen images")
        from mindsemantix.eval.feature_nets import load_clip

        clip_s, refclip_s = clip_scores({k: predictions[k] for k in keys}, references, images, load_clip(clip_path))
        metrics["CLIP-S"], metrics["RefCLIP-S"] = clip_s, refclip_s
        info["clip"] = {"path": str(clip_path), "w": CLIPSCORE_W, "prefix": CLIPSCORE_PREFIX.strip()}

    for name, value in metrics.items():
        if not math.isfinite(value):
            raise RuntimeError(f"{name} is {value}: check the inputs")
    ordered = {k: float(metrics[k]) for k in CORE_KEYS + OPTIONAL_KEYS if k in metrics}
    return {"metrics": ordered, "info": info, "keys": keys,
            "per_image": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in per_image.items()}}


def reference_ceiling(references: Mapping[str, Sequence[str]], **score_kwargs) -> dict[str, Any]:
    """Human agreement: each reference scored as a prediction against the other references of its
    image (keys with at least 2 references), all in one scoring run. Returns score_captions' dict."""
    predictions: dict[str, str] = {}
    others: dict[str, list[str]] = {}
    for key, refs in references.items():
        if len(refs) < 2:
            continue
        for i, ref in enumerate(refs):
            predictions[f"{key}#{i}"] = ref
            others[f"{key}#{i}"] = list(refs[:i]) + list(refs[i + 1:])
    if not predictions:
        raise CaptionInputError("the ceiling needs keys with at least 2 references; none have")
    if score_kwargs.get("images") is not None:
        score_kwargs["images"] = {pk: score_kwargs["images"][pk.rsplit("#", 1)[0]] for pk in predictions}
    result = score_captions(predictions, others, **score_kwargs)
    result["info"]["ceiling"] = (f"each of the references of {len({p.rsplit('#', 1)[0] for p in predictions})} "
                                 "images scored against the others")
    return result


# ---------------------------------------------------------------------------------------------
# CLI: mindsemantix score-captions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindsemantix score-captions",
                                description="Caption metrics (BrainHub protocol) of predictions against references.")
    p.add_argument("--predictions", required=True, help='JSONL, lines {"key": ..., "caption": ...}')
    p.add_argument("--references", required=True, help='JSONL, lines {"key": ..., "captions": [...]}')
    p.add_argument("--out", required=True, help="metrics JSON to write: {\"metrics\": {...}, \"info\": {...}}")
    p.add_argument("--meteor", choices=["auto", "java", "nltk", "off"], default="auto")
    p.add_argument("--spice", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--sentence-encoder", default=DEFAULT_SENTENCE_ENCODER,
                   help="hub id or local folder of a sentence encoder; 'none' to skip SentenceSim")
    p.add_argument("--sentence-sim", choices=["best", "mean"], default="best")
    p.add_argument("--clip", default=None, help="CLIP folder (hub id or path) for CLIP-S / RefCLIP-S; needs --images")
    p.add_argument("--images", default=None, help="folder of seen images, <key>.png, for CLIP-S")
    p.add_argument("--ceiling", action="store_true", help="also score each reference against the others")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        predictions = read_predictions_jsonl(args.predictions)
        references = read_references_jsonl(args.references)
        images = None
        if args.clip:
            if not args.images:
                raise CaptionInputError("--clip needs --images (the seen images, one <key>.png each)")
            from mindsemantix.eval.images import read_image_folder

            images = read_image_folder(args.images, keys=predictions)
        kwargs = dict(sentence_encoder=None if args.sentence_encoder == "none" else args.sentence_encoder,
                      sentence_sim=args.sentence_sim, clip_path=args.clip, images=images,
                      meteor=args.meteor, spice=args.spice)
        result = score_captions(predictions, references, **kwargs)
        if args.ceiling:
            result["ceiling"] = reference_ceiling(references, **kwargs)
    except (CaptionInputError, RuntimeError, FileNotFoundError) as e:
        print(f"score-captions: error: {e}", file=sys.stderr)
        return 2
    write_scores(args.out, result, {"predictions": str(args.predictions), "references": str(args.references)})
    return 0


def write_scores(out: str | Path, result: dict[str, Any], sources: dict[str, str], notes: Iterable[str] = ()) -> None:
    """The scorers' ending: record the inputs, write the JSON atomically, print the metrics."""
    result["info"].update(sources)
    write_json_atomic(out, result)
    width = max((len(n) for n in result["metrics"]), default=0) + 1
    for name, value in result["metrics"].items():
        print(f"{name:{width}s} {value:.4f}")
    for note in notes:
        print(note)
    print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
