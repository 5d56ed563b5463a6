#!/usr/bin/env bash
# Run here (where pip reaches the package index), before a GPU check: puts into .whl/ (git-ignored) the wheels of
# the packages vistrain needs that the device machine's python3 (3.12, x86-64) lacks, at constraints.txt's versions.
# Then, in one device call:  carry [".whl"], command "bash benchmarks/gpu_check.sh" (it installs them first).
#
#   bash benchmarks/gpu_wheels.sh [PACKAGE ...]     (default: the list below)
#
# The list: pydantic and its own needs (the config), kornia (augment.device: cuda). Everything else vistrain's GPU
# steps import (torch, timm, torchvision, pandas, scikit-learn, OpenCV, onnxruntime, pytest, ...) is there already
# (the device README's KINDS.md lists the machine's packages). About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("$@")
((${#packages[@]})) || packages=(pydantic pydantic_core annotated-types typing-inspection typing_extensions kornia kornia_rs)
pins=()
for name in "${packages[@]}"; do
  # constraints.txt spells names either way (kornia_rs, typing-inspection): match - and _ alike, any case
  pattern="^$(sed 's/[-_]/[-_]/g' <<<"$name")=="
  pin=$(grep -iE "$pattern" constraints.txt | head -1 || true)
  [[ -n $pin ]] || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two would stop the install there
PY=${PYTHON:-python3}
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
