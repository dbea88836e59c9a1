#!/usr/bin/env bash
# Build device_wheels/: the wheels a bare GPU machine needs to run scripts/device_check.sh offline.
#
#   bash scripts/pack_device_wheels.sh            # -> device_wheels/ (git-ignored), prints its size
#   WHEELS=/tmp/w PY_TARGET=3.11 bash scripts/pack_device_wheels.sh   # another folder / Python
#
# The GPU machine (docs/distributed.md, "GPU") has Python 3.12 with torch, transformers, accelerate, peft, triton,
# safetensors, numpy and pytest, and no network. This script takes the project's own dependency list
# (pyproject.toml `dependencies` + the `deepspeed` extra), drops what is there already (those packages and
# torch's, numpy's and pytest's own dependencies), and brings the rest with all of its dependencies (pip
# skips on the machine whatever is there already), pinned to the versions
# installed in this repository's .venv (where the test suite passes):
#   * binary/pure-python wheels: `pip download --only-binary=:all: --python-version 3.12 --platform
#     manylinux... --no-deps`, one package at a time;
#   * packages published only as source (DeepSpeed, antlr4-python3-runtime): `pip wheel --no-deps
#     --no-build-isolation` here (DeepSpeed with DS_BUILD_OPS=0: no compiled ops, a py3-none-any wheel).
# Left out on purpose:
#   * datasets (+ pyarrow, pandas: ~60 MiB): imported lazily, only by data sources that read the Hub or
#     local files (mora_train/data/sources.py); the check's jobs (task=uuid, random-init models) never do.
#   * bitsandbytes: only for a quantized base (QMoRA); its wheel alone is 41 MiB, which does not fit in the
#     64 MiB carry beside the rest. device_check.sh skips its `quantized` step (and says so) without it;
#     to run that step, carry a folder with just `pip download --only-binary=:all: --no-deps --python-version
#     3.12 --platform manylinux_2_24_x86_64 bitsandbytes` and install it there first.
# It also writes device_wheels/requirements.txt (the top-level requirements, pyproject's specifiers) that
# scripts/device_check.sh installs with `pip install --no-index --find-links device_wheels -r ...`: pip
# keeps whatever the machine already has that satisfies them.
# Needs: .venv with the project and the deepspeed extra (bash scripts/setup.sh does both) and the package
# registry. Limit: the whole working tree that travels to the GPU machine is capped at 64 MiB, so the
# folder must stay under LIMIT_MIB (default 60); the script fails if it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-device_wheels}
PY_TARGET=${PY_TARGET:-3.12}
LIMIT_MIB=${LIMIT_MIB:-60}
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT

# Resolve: which distributions to bring (name==version per line) and the top-level requirements.
PY_TARGET=$PY_TARGET WHEELS=$WHEELS "$py" - > "$pins" <<'PY'
import os, re, sys, tomllib
from importlib import metadata
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

target = os.environ["PY_TARGET"]
env = {**default_environment(), "python_version": target, "python_full_version": target + ".0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# On the GPU machine already (with everything they depend on, which pip installed with them).
PRESENT = ["torch", "transformers", "accelerate", "peft", "triton", "safetensors", "numpy", "pytest"]
# Not needed by the check's code paths (see the header of this script).
LEFT_OUT = {"datasets", "bitsandbytes"}

def requires(name: str, extras: set[str]) -> list[Requirement]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        if name in ("triton",):  # a CUDA-only dependency of torch: absent from a CPU venv, present there
            return []
        sys.exit(f"pack_device_wheels: {name} is not installed in this venv; run bash scripts/setup.sh first")
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
            out.append(req)
    return out

def closure(roots: list[Requirement], stop: set[str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canon(req.name)
        if name in stop:
            continue
        new = set(req.extras) - seen.get(name, {"<none>"})
        if name in seen and not new:
            continue
        seen.setdefault(name, set()).update(req.extras)
        todo.extend(requires(name, set(req.extras) | {""}))
    return seen

# Only torch's, numpy's and pytest's own dependencies count as present (they are what torch and pytest install
# with themselves); what transformers/accelerate/peft pull in changes between their versions (transformers
# 5.24 brings typer -> pydantic, older ones do not), so anything else the packed set needs is packed too.
present = set(closure([Requirement(p) for p in ("torch", "numpy", "pytest")], set())) | {canon(p) for p in PRESENT}
project = tomllib.loads(open("pyproject.toml", "rb").read().decode())["project"]
top = [Requirement(t) for t in project["dependencies"] + project["optional-dependencies"]["deepspeed"]]
top = [r for r in top if canon(r.name) not in present | LEFT_OUT and (r.marker is None or r.marker.evaluate(env))]
needed = closure(top, present | LEFT_OUT)
with open(os.path.join(os.environ["WHEELS"], "requirements.txt"), "w") as f:
    f.write("# Written by scripts/pack_device_wheels.sh; installed offline by scripts/device_check.sh.\n")
    f.write(f"# Assumed present on the GPU machine (not packed): {', '.join(PRESENT)}, and torch's own dependencies.\n")
    f.write("".join(f"{r}\n" for r in top))
for name in sorted(needed):
    print(f"{name}=={metadata.version(name)}")
PY

echo "packing $(wc -l < "$pins") distributions for Python $PY_TARGET into $WHEELS/"
pyver=${PY_TARGET/./}
while read -r pin; do
    name=${pin%%==*}
    if "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$WHEELS" \
        --python-version "$PY_TARGET" --implementation cp --abi "cp$pyver" --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform linux_x86_64 --platform any "$pin" >/dev/null 2>&1; then
        echo "  $pin: downloaded"
        continue
    fi
    # Published only as source: build it here. Only pure-python results are acceptable (any Python, any OS).
    before=$(ls "$WHEELS")
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$WHEELS" "$pin" >/dev/null
    built=$(comm -13 <(echo "$before") <(ls "$WHEELS"))
    case "$built" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) echo "  $pin: built from source ($built)" ;;
        *) echo "pack_device_wheels: $pin has no wheel for Python $PY_TARGET and builds to '$built' (not pure Python)" >&2
           exit 1 ;;
    esac
done < "$pins"

size_kib=$(du -sk "$WHEELS" | cut -f1)
echo "$WHEELS/: $(ls "$WHEELS"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB ($size_kib KiB)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "pack_device_wheels: $WHEELS/ is over ${LIMIT_MIB} MiB: it would not travel with the working tree" >&2
    exit 1
fi
