"""How long the ΔW spectrum (mora_train.analysis.spectrum) takes for SmolLM2-135M on this machine.

Each case saves an adapter (or a merged model) with random non-zero weights, then times exactly
what `mora-train-spectrum PATH --base-model smollm2-135m` does: load the base model, attach the
adapter (or load the merged model), build every ΔW and take its singular values.

    python benchmarks/spectrum_time.py --quick          # LoRA r=8 only
    python benchmarks/spectrum_time.py                  # LoRA r=8, MoRA r=8 and r=256, merged-vs-base
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mora_train.adapters import build_adapter
from mora_train.analysis.spectrum import load_base_model, run_spectrum, summarize
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import named_model_config

BASE = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_(params: dict[str, torch.nn.Parameter], scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in params.values():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def adapter_case(adapter: str, rank: int, mora_type: str, workdir: Path) -> tuple[float, float, dict]:
    model, _ = load_model_and_tokenizer(named_model_config(BASE))
    cfg = OmegaConf.create(
        {"name": adapter, "alpha": 16, "mora_type": mora_type, "target_modules": TARGETS, "dropout": 0.0}
    )
    wrapped = build_adapter(model, cfg, rank)
    randomize_(wrapped.trainable_parameters(), 0.01)
    folder = workdir / f"{adapter}-{rank}"
    folder.mkdir()
    wrapped.save(folder)
    return timed(folder)


def timed(folder: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds (CPU: all threads; on a busy shared machine wall time overstates the cost)."""
    wall, cpu = time.perf_counter(), time.process_time()
    spectra, _ = run_spectrum(folder, base_model=BASE)
    return time.perf_counter() - wall, time.process_time() - cpu, summarize(spectra, 0.1)


def merged_case(workdir: Path) -> tuple[float, float, dict]:
    model = load_base_model(named_model_config(BASE))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 3e-3)
    folder = workdir / "merged"
    model.save_pretrained(folder)
    return timed(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LoRA r=8 only")
    args = parser.parse_args()
    cases = (
        [("lora", 8, "rope")] if args.quick else [("lora", 8, "rope"), ("mora", 8, "rope"), ("mora", 256, "sharing")]
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ΔW of all 210 SmolLM2 projections")
    with tempfile.TemporaryDirectory() as tmp:
        for adapter, rank, mora_type in cases:
            label = f"{adapter} r={rank}" + (f" ({mora_type})" if adapter == "mora" else "")
            report(label, *adapter_case(adapter, rank, mora_type, Path(tmp)))
        if not args.quick:
            report("merged - base", *merged_case(Path(tmp)))


def report(label: str, wall: float, cpu: float, summary: dict) -> None:
    print(
        f"{label:<22} wall {wall:6.1f} s  cpu {cpu:6.1f} s   sv>0.1 per layer: mean {summary['mean']:.1f}, "
        f"max {summary['max']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
