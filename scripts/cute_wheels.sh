#!/usr/bin/env bash
# The `hopper` extra (kernels/cute.py: FlashAttention 4 and quack, CuTe DSL) for a GPU machine without network:
# its wheels for Python 3.12 / x86-64 / CUDA 13, in two carries of under 64 MiB (the device tool's limit per call).
#
#   scripts/cute_wheels.sh fetch            # here: .whl/cute1 (the small wheels + half of the DSL's libraries)
#                                           #       .whl/cute2 (the other half)
#   scripts/cute_wheels.sh stash            # there, call 1 (carry .whl/cute1): copies it to /tmp/cute_wheels
#   scripts/cute_wheels.sh install          # there, call 2 (carry .whl/cute2): joins the halves, installs into
#                                           #   /tmp/site; then: export PYTHONPATH=$(scripts/cute_wheels.sh path)
#   scripts/cute_wheels.sh path             # the PYTHONPATH entries the installed packages need
#
# The machine must stay warm between the two calls (it keeps /tmp). Packages the GPU image already has
# (cuda-bindings, cuda-pathfinder, einops, protobuf, typing-extensions) are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(flash-attn-4==4.0.0b40 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
      torch-c-dlpack-ext==0.1.5)
STASH=/tmp/cute_wheels
SITE=/tmp/site

case "${1:-}" in
fetch)
    rm -rf .whl/cute1 .whl/cute2 && mkdir -p .whl/cute1 .whl/cute2
    plats=()
    for n in 17 24 27 28 31 34 35; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plats[@]}" --platform manylinux2014_x86_64 -d .whl/cute1 "${PINS[@]}"
    big=$(ls .whl/cute1/nvidia_cutlass_dsl_libs_cu13-*.whl)
    split -n 2 -d "$big" ".whl/cute2/$(basename "$big").part"
    mv ".whl/cute2/$(basename "$big").part00" .whl/cute1/ && rm "$big"
    du -sh .whl/cute1 .whl/cute2
    ;;
stash)
    mkdir -p "$STASH" && cp .whl/cute1/* "$STASH"/ && ls "$STASH"
    ;;
install)
    cp .whl/cute2/* "$STASH"/
    for first in "$STASH"/*.part00; do
        whl="${first%.part00}"
        cat "$whl".part* > "$whl" && rm "$whl".part*
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STASH"/*.whl
    echo "installed into $SITE; export PYTHONPATH=$("$0" path):\$PYTHONPATH"
    ;;
path)
    echo "$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"
    ;;
*)
    sed -n 2,14p "$0" && exit 2
    ;;
esac
