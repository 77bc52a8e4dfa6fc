#!/usr/bin/env bash
# Installs flatminima and everything its tests and demo need, on a fresh machine of this
# project's type (Debian, Python 3.11, no GPU). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# torch first, pinned: a bare or ranged torch requirement would download a multi-GB CUDA build.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"

# Fashion-MNIST comes from Debian (the original IDX files); data is never downloaded at run time.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
