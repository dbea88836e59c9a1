#!/usr/bin/env bash
# The GPU check: one command, ≤ 8 minutes on one H200, results in RESULTS_DIR (results.md, results.json,
# check.log, gpu-tests.xml), written after every step, so a failed or timed-out step still leaves them.
#
#   scripts/device_check.sh RESULTS_DIR              # on the GPU machine (docs/distributed.md, "GPU")
#   scripts/device_check.sh --dry-run RESULTS_DIR    # on CPU, tiny sizes: every step that can run there
#   options: --wheels DIR (default: device_wheels, built by scripts/pack_device_wheels.sh; given with
#            --dry-run, the dry run installs from it too: how to try the folder on a bare CPU machine)
#   environment: PYTHON (default: .venv/bin/python when present, else python3), DEVICE_CHECK_BUDGET_S (470)
#
# Steps, each under its own timeout (and the overall budget), each recorded as passed/failed/timeout/skipped:
#   install      the carried wheels, offline: pip install --no-index --find-links DIR -r DIR/requirements.txt
#                (keeps the machine's torch/transformers/accelerate/peft); the project itself is used from
#                this folder via PYTHONPATH (no build, no install); skipped in the dry run (.venv has it all)
#   environment  python, torch, CUDA, GPU name and memory, package versions (after the install)
#   gpu-tests    pytest -m gpu tests/gpu: MoRA types vs the float64 reference, a training run per adapter,
#                bf16 + gradient checkpointing, ZeRO-2 / ZeRO-3 / FSDP in one process vs the plain run, nf4 MoRA
#                and int8 LoRA runs with both merge checks (the int8 kernel tolerance measured on a GPU).
#                Dry run: the same tests on CPU (MORA_TRAIN_TEST_DEVICE=cpu) with tiny sizes, FSDP skipped
#                (CUDA only) and ZeRO-2 deselected (same test code as ZeRO-3, 30 s of CPU; CI runs ZeRO-2)
#   throughput   benchmarks/gpu_throughput.py: llama-1b, bf16, seq 2048: full FT, LoRA r=8, MoRA sharing/rope
#                r=8 and r=256; tokens/s, MFU, peak memory, ratios to LoRA. Dry run: tiny-llama on CPU
#   quantized    benchmarks/gpu_throughput.py --quantized: llama-1b nf4 MoRA vs nf4 LoRA vs bf16 MoRA (needs
#                bitsandbytes on the machine; skipped, and said so, without it)
# Exit status: 0 when no step failed or timed out.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

dry_run=0 wheels=$repo/device_wheels wheels_given=0 results=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --wheels) wheels=$(cd "$2" 2>/dev/null && pwd || echo "$2"); wheels_given=1; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) echo "device_check: unknown option $1" >&2; exit 2 ;;
        *) results=$1; shift ;;
    esac
done
if [ -z "$results" ]; then
    echo "usage: scripts/device_check.sh [--dry-run] [--wheels DIR] RESULTS_DIR" >&2
    exit 2
fi
mkdir -p "$results"
results=$(cd "$results" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
log=$results/check.log
: > "$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    py=$repo/.venv/bin/python
else  # the interpreter that has torch (a bare GPU machine may have python3 and python apart)
    py=python3
    for candidate in python3 python; do
        if "$candidate" -c "import torch" >/dev/null 2>&1; then py=$(command -v "$candidate"); break; fi
    done
fi
export PYTHON=$py PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export MORA_TRAIN_DEVICE_RESULTS=$work/measurements.jsonl HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$MORA_TRAIN_DEVICE_RESULTS"
started=$(date +%s)
deadline=$((started + ${DEVICE_CHECK_BUDGET_S:-470}))
mode=$([ $dry_run -eq 1 ] && echo "dry run (CPU, tiny sizes)" || echo "GPU")
echo "device_check: $mode; results in $results; python $py; budget ${DEVICE_CHECK_BUDGET_S:-470} s"

record() {  # name status seconds note
    "$py" -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "seconds": float(sys.argv[3]), "note": sys.argv[4]}))' \
        "$1" "$2" "$3" "$4" >> "$work/steps.jsonl"
    echo "== step $1: $2 (${3} s) $4"
    assemble
}

step() {  # name budget_s note command...
    local name=$1 budget=$2 note=$3
    shift 3
    local left=$((deadline - $(date +%s) - 15))
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 10 ]; then
        record "$name" skipped 0 "out of time (overall budget spent)"
        return
    fi
    echo "== step $name (timeout ${budget} s): $*"
    local t0 rc status ms
    t0=$(date +%s%N)
    timeout --kill-after=15 "$budget" "$@"
    rc=$?
    case $rc in
        0) status=passed ;;
        124|137) status=timeout; note="killed after ${budget} s. $note" ;;
        *) status=failed; note="exit $rc. $note" ;;
    esac
    ms=$((($(date +%s%N) - t0) / 1000000))
    record "$name" "$status" "$((ms / 1000)).$(printf %03d $((ms % 1000)))" "$note"
}

assemble() {  # results.md + results.json from everything gathered so far
    DRY_RUN=$dry_run WORK=$work RESULTS=$results MODE="$mode" STARTED=$started "$py" - <<'PY' || echo "device_check: could not assemble the results" >&2
import json, os, time
import xml.etree.ElementTree as ET
from pathlib import Path

work, results = Path(os.environ["WORK"]), Path(os.environ["RESULTS"])

def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

steps = lines(work / "steps.jsonl")
measurements = lines(work / "measurements.jsonl")
env = load(work / "environment.json") or {}
throughput = load(work / "throughput.json")
tests = []
junit = results / "gpu-tests.xml"
if junit.exists():
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or "")[:300]
            tests.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    except ET.ParseError:
        pass
record = {"mode": os.environ["MODE"], "dry_run": os.environ["DRY_RUN"] == "1",
          "wall_s": time.time() - float(os.environ["STARTED"]), "environment": env, "steps": steps,
          "tests": tests, "measurements": measurements, "throughput": throughput}
(results / "results.json").write_text(json.dumps(record, indent=1, default=str))

md = [f"# Device check: {record['mode']}", ""]
if env:
    md += [f"{env.get('date', '')}; {env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch {env.get('torch')} "
           f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, "
           f"peft {env.get('peft')}, deepspeed {env.get('deepspeed')}; wall {record['wall_s']:.0f} s.", ""]
md += ["| step | status | seconds | note |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |" for s in steps]
if tests:
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    md += ["", "## GPU tests", "", ", ".join(f"{n} {o}" for o, n in counts.items() if n), ""]
    bad = [t for t in tests if t["outcome"] != "passed"]
    if bad:
        md += ["| test | outcome | message |", "|---|---|---|"]
        md += [f"| {t['test']} | {t['outcome']} | {t['message'].replace('|', '/').splitlines()[0] if t['message'] else ''} |" for t in bad]
layers = [m for m in measurements if m["kind"] == "mora_layer"]
if layers:
    md += ["", "## MoRA layers vs the CPU float64 reference (worst relative error per precision)", "",
           "| precision | cases | forward | grad x | grad M | delta_weight | merged forward | tolerance |", "|---|---|---|---|---|---|---|---|"]
    for precision in dict.fromkeys(m["precision"] for m in layers):
        rows = [m for m in layers if m["precision"] == precision]
        worst = {k: max(m[k] for m in rows) for k in ("forward", "grad_x", "grad_M", "delta_weight", "merged_forward")}
        md.append(f"| {precision} | {len(rows)} | " + " | ".join(f"{v:.1e}" for v in worst.values()) + f" | {rows[0]['tolerance']:.0e} |")
def section(title, columns, rows):
    """A results.md table: its heading, header row and one row of cells per measurement."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def peak(m):
    return "-" if m["peak_gpu_memory_gib"] is None else f"{m['peak_gpu_memory_gib']:.2f}"


runs = [m for m in measurements if m["kind"] == "training" and "first_loss" in m]
if runs:
    md += section("## Training runs (tiny-llama, 12 steps)",
                  ["run", "first loss", "last loss", "merge check (max diff / tol)", "reload device vs CPU", "peak GPU GiB"],
                  [[m["run"], f"{m['first_loss']:.4f}", f"{m['last_loss']:.4f}",
                    f"{m['merge_check']} ({m['merge_max_abs_diff']:.1e} / {m['merge_tolerance']:.1e})",
                    f"{m['reload_device_vs_cpu']:.1e}", peak(m)] for m in runs])
quantized = [m for m in measurements if m["kind"] == "quantized_merge"]
if quantized:
    md += section("## Quantized runs: kernel check and merge check (tiny-llama, 6 steps)",
                  ["run", "kernel diff / tolerance (ratio)", "merge diff / tolerance", "merge check"],
                  [[m["run"], f"{m['kernel_diff']:.1e} / {m['kernel_tolerance']:.1e} "
                    f"({'-' if m['kernel_ratio'] is None else format(m['kernel_ratio'], '.2f')})",
                    f"{m['merge_max_abs_diff']:.1e} / {m['merge_tolerance']:.1e}", m["merge_check"]] for m in quantized])
engines = [m for m in measurements if m["kind"] == "engine"]
if engines:
    md += section("## Engines in one process vs the plain run (MoRA, tiny-llama, 6 steps, fp32)",
                  ["engine", "max loss diff (tol)", "max merged weight diff (tol)", "merge check", "tokens/s",
                   "peak GPU GiB", "wall s"],
                  [[m["engine"], f"{m['max_loss_diff']:.1e} ({m['loss_tolerance']:.0e})",
                    f"{m['max_merged_weight_diff']:.1e} ({m['weight_tolerance']:.0e})", m["merge_check"],
                    f"{m['tokens_per_s']:.0f}", peak(m), f"{m['wall_s']:.0f}"] for m in engines])
if (work / "throughput.md").exists():
    md += ["", "## Throughput", "", (work / "throughput.md").read_text().strip()]
if (work / "quantized.md").exists():
    md += ["", "## QMoRA: nf4 base vs bf16 base", "", (work / "quantized.md").read_text().strip()]
(results / "results.md").write_text("\n".join(md) + "\n")
PY
}

# -- install -------------------------------------------------------------------------------------------------
imports="import hydra, omegaconf, math_verify, matplotlib, tensorboard, deepspeed, mora_train.pipeline.train; print('imports ok')"
if [ $dry_run -eq 1 ] && [ $wheels_given -eq 0 ]; then
    record install skipped 0 "dry run: this environment already has everything (bash scripts/setup.sh)"
elif [ -f "$wheels/requirements.txt" ]; then
    step install 150 "offline from $(basename "$wheels")/ ($(du -sh "$wheels" | cut -f1))" bash -c '
        { "$0" -m pip --version >/dev/null 2>&1 || "$0" -m ensurepip; } &&
        DS_BUILD_OPS=0 "$0" -m pip install --no-index --find-links "$1" -r "$1/requirements.txt" && "$0" -c "$2"' \
        "$py" "$wheels" "$imports"
elif "$py" -c "$imports" >/dev/null 2>&1; then
    record install skipped 0 "no $wheels/requirements.txt, and every package imports already"
else
    record install failed 0 "no $wheels/requirements.txt (build it with scripts/pack_device_wheels.sh and carry it)"
fi

# -- environment ---------------------------------------------------------------------------------------------
step environment 60 "" "$py" - "$work/environment.json" <<'PY'
import json, platform, subprocess, sys, time
from importlib import metadata
import torch
info = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB)", bf16=torch.cuda.is_bf16_supported())
for name in ("transformers", "accelerate", "peft", "deepspeed", "hydra-core", "omegaconf", "safetensors", "numpy", "triton"):
    try:  # versions without importing (importing deepspeed alone takes seconds)
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = "not installed"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info))
PY

# -- GPU tests -----------------------------------------------------------------------------------------------
pytest_args=(-m pytest -m gpu tests/gpu -q -rfEs -p no:cacheprovider --junitxml="$results/gpu-tests.xml" -o junit_family=xunit2)
if [ $dry_run -eq 1 ]; then
    step gpu-tests 240 "on CPU with tiny sizes (MORA_TRAIN_TEST_DEVICE=cpu); FSDP skipped (CUDA only); ZeRO-2 deselected (same test code as ZeRO-3)" \
        env MORA_TRAIN_TEST_DEVICE=cpu OMP_NUM_THREADS=1 "$py" "${pytest_args[@]}" \
        --deselect "tests/gpu/test_engines_device.py::test_engine_matches_plain_run[zero2]"
elif "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step gpu-tests 270 "pytest -m gpu tests/gpu on CUDA" env MORA_TRAIN_TEST_DEVICE=cuda "$py" "${pytest_args[@]}"
else
    record gpu-tests failed 0 "no CUDA device (use --dry-run on CPU)"
fi

# -- throughput ----------------------------------------------------------------------------------------------
tp_args=(benchmarks/gpu_throughput.py --json "$work/throughput.json" --md "$work/throughput.md")
if [ $dry_run -eq 1 ]; then
    step throughput 90 "tiny-llama on CPU, seq 64, batch 2 (checks the script; the numbers mean nothing)" \
        env OMP_NUM_THREADS=1 "$py" "${tp_args[@]}" --dry-run
elif "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step throughput 200 "llama-1b, bf16, seq 2048" "$py" "${tp_args[@]}"
else
    record throughput failed 0 "no CUDA device (use --dry-run on CPU)"
fi

# -- quantized: QMoRA vs QLoRA on an nf4 base, and bf16 MoRA ---------------------------------------------
q_args=(benchmarks/gpu_throughput.py --quantized --json "$work/quantized.json" --md "$work/quantized.md")
if ! "$py" -c "import bitsandbytes" 2>/dev/null; then
    # Its 41 MiB wheel does not fit in the 64 MiB carry beside the others (scripts/pack_device_wheels.sh).
    record quantized skipped 0 "bitsandbytes is not installed (carry its wheel: pip download bitsandbytes)"
elif [ $dry_run -eq 1 ]; then
    step quantized 90 "tiny-llama nf4 on CPU (checks the script; the numbers mean nothing)" \
        env OMP_NUM_THREADS=1 "$py" "${q_args[@]}" --dry-run
elif "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step quantized 150 "llama-1b, seq 2048: nf4 MoRA rope r=8 vs nf4 LoRA r=8 vs bf16 MoRA rope r=8" \
        "$py" "${q_args[@]}" --rounds 1
else
    record quantized failed 0 "no CUDA device (use --dry-run on CPU)"
fi

failed=$(grep -c '"status": "\(failed\|timeout\)"' "$work/steps.jsonl" || true)
echo "device_check: done in $(($(date +%s) - started)) s; $failed step(s) failed; results: $results/results.md"
rm -rf "$work"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # check.log complete before the caller collects it
[ "$failed" -eq 0 ]
