#!/usr/bin/env bash
# Wheels for benchmark/gpu_check.sh on the device machine (Python 3.12, x86-64, with torch, numpy, h5py, tensorboard,
# tqdm, typer and pytest, but no gymnasium, mujoco, minari or tyro): the versions installed in the project's own
# Python (PYTHON, default `python`, e.g. the venv of `pip install -r requirements.txt`), with every requirement
# of theirs the device lacks, typing_extensions included (tyro and typeguard need a recent one). Into .whl/ (git
# ignores it); carry .whl with the device call. About 30 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in gymnasium farama-notifications mujoco mujoco-core mujoco-studio mujoco-studio-wasm websockets glfw \
    pyopengl minari tyro docstring-parser typeguard typing-extensions; do
    packages+=("$name==$(version "$name")")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "${packages[@]}"
ls .whl
