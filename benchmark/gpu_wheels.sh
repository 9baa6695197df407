#!/usr/bin/env bash
# Wheels for benchmark/gpu_check.sh on the device machine (Python 3.12, x86-64, torch and tensorboard there, but
# no gymnasium, mujoco, minari or tyro): the versions installed here, into .whl/ (git ignores it). Carry .whl
# with the device call. About 26 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in gymnasium farama-notifications mujoco mujoco-core mujoco-studio websockets glfw pyopengl minari tyro \
    docstring-parser typeguard; do
    packages+=("$name==$(version "$name")")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "${packages[@]}"
ls .whl
