#!/usr/bin/env bash
# Installs flatminima with every extra (experiments, tests, integrations, docs) on a fresh
# machine of this project's type (Debian, Python 3.11, no GPU). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# torch first, pinned: a bare or ranged torch requirement would download a multi-GB CUDA build.
# Then everything else under the same pin (scripts/constraints.txt), so that no extra's
# requirement can make pip pick another torch. The package's own requirement is torch>=2.13.
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -c scripts/constraints.txt torch
"${PIP[@]}" -c scripts/constraints.txt -e ".[experiments,test,lightning,transformers,accelerate,ray,docs]"

# Fashion-MNIST comes from Debian (the original IDX files); data is never downloaded at run time.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
