#!/usr/bin/env bash
# Build the wheelhouse that deploy/install.sh installs from, on a machine with access to a
# package index (PyPI or a mirror). Copy the project folder, wheelhouse/ included, to the server.
#
#   deploy/build-wheelhouse.sh [OUT] [pip download options]
#
# OUT defaults to <project>/wheelhouse. By default the wheels fit this machine's Python and CPU;
# for a different server pass its Python version and platform, e.g. for Ubuntu 22.04 x86_64 with
# python3.11:  deploy/build-wheelhouse.sh wheelhouse --python-version 3.11 --platform manylinux_2_28_x86_64
# Add onnxruntime-gpu here (and install it into the venv) for CUDA servers.
set -euo pipefail

SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${1:-$SOURCE/wheelhouse}")
shift $(($# > 0 ? 1 : 0))
PYTHON=${PYTHON:-python3}

mkdir -p "$OUT"
# The platform's own packages are pure Python: built here, for any Python 3.11+.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" \
    "$SOURCE" "$SOURCE/plugins/summarize" "$SOURCE/plugins/translate" "$SOURCE/plugins/classify"
# Their dependencies, as binary wheels only (the server has no compiler and no index). Named by
# file, so an unrelated package of the same name on the index can never replace them.
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$OUT" "$@" \
    "$OUT"/ai_platform-*.whl "$OUT"/ai_platform_{summarize,translate,classify}-*.whl
echo "wheelhouse: $OUT ($(find "$OUT" -name '*.whl' | wc -l) wheels)"
