"""Spectrum of the weight update ΔW (paper Fig. 5): per layer, how many singular values exceed a threshold.

LoRA's ΔW = (alpha/r) B A has rank at most r, so its count never exceeds r; MoRA's square matrix
can reach rank r̂, full fine-tuning any rank. ΔW comes from either

* an adapter folder re-attached to its base model (`Adapter.delta_weights()`, exact, fp32), or
* a merged model minus its base model, weight by weight (any run, full fine-tuning included).

Singular values are computed once per run and cached in RUN_DIR/spectrum.safetensors, so a report
can recount them at any threshold for free.

    mora-train-spectrum RUN_DIR [--threshold 0.1]
    mora-train-spectrum ADAPTER_DIR --base-model smollm2-135m
    mora-train-spectrum MERGED_DIR --base-model /path/to/base --threshold 0.05

A run still being written (its run-dir lock) is refused. --out never lies inside what is read (a run's
adapter/, merged/ or checkpoints/, an adapter or model folder) and never overwrites spectrum files this
command did not write.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mora_train.core.errors import MoraTrainError, non_negative_float, report_unexpected
from mora_train.core.io import save_figure_atomically, write_file_atomically
from mora_train.core.outputs import FILES, check_output_target
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.models.config import ModelConfig
from mora_train.pipeline.run_config import named_model_config, saved_run_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1  # the paper's Fig. 5 counts singular values > 0.1
SPECTRUM_FILE = "spectrum.safetensors"
SPECTRUM_PLOT = "spectrum.png"
_BLOCK = re.compile(r"\.(\d+)\.")


@dataclass
class LayerSpectrum:
    """Singular values (descending, fp32) of one layer's ΔW."""

    name: str
    d_out: int
    d_in: int
    singular_values: torch.Tensor

    @property
    def kind(self) -> str:
        """Last name component, e.g. q_proj."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def block(self) -> int | None:
        """Transformer block index (the number in `layers.N.`), if any."""
        match = _BLOCK.search(f".{self.name}.")
        return int(match.group(1)) if match else None

    def count_above(self, threshold: float) -> int:
        return int((self.singular_values > threshold).sum().item())


def singular_values_of(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of one matrix, descending, float32.

    Taken as square roots of the eigenvalues of the float64 Gram matrix (the smaller side):
    2-4x faster than an SVD on CPU for SmolLM2's 576x1536 layers and steadier across shapes,
    with absolute error ~1e-8 x the largest singular value, far below any useful threshold.
    """
    matrix = delta.detach().to("cpu", torch.float64)
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0).to(torch.float32)


def count_singular_values_above(delta: torch.Tensor, threshold: float = 0.1) -> int:
    """Number of singular values of one ΔW above `threshold` (the paper's Fig. 5 rank measure): the one
    counter the sweep report, `mora-train-spectrum` and the benchmarks share."""
    return int((singular_values_of(delta) > threshold).sum().item())


def singular_values(delta_weights: dict[str, torch.Tensor]) -> list[LayerSpectrum]:
    """Singular values of each ΔW (see singular_values_of), in the order given."""
    spectra = []
    for name, delta in delta_weights.items():
        if not torch.isfinite(delta).all():
            raise MoraTrainError(f"ΔW of layer {name} has NaN/Inf values; the run's weights are not usable")
        spectra.append(LayerSpectrum(name, delta.shape[0], delta.shape[1], singular_values_of(delta)))
    return spectra


def counts_above(spectra: list[LayerSpectrum], threshold: float) -> dict[str, int]:
    return {s.name: s.count_above(threshold) for s in spectra}


# -- where ΔW comes from ------------------------------------------------------------------------------


def adapter_deltas(base_model: PreTrainedModel, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted layer of a saved LoRA/MoRA adapter, attached to `base_model` (which it modifies)."""
    from mora_train.adapters import load_adapter

    try:
        adapter = load_adapter(base_model, adapter_dir)
    except MoraTrainError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt adapter files, or an adapter of another base model
        raise MoraTrainError(
            f"could not attach the adapter in {adapter_dir} to its base model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); its files are corrupt or it belongs to "
            "another base model (pass that one with --base-model)"
        ) from None
    return adapter.delta_weights()


def merged_deltas(base_model: nn.Module, merged_model: nn.Module) -> dict[str, torch.Tensor]:
    """W_merged - W_base for every linear layer inside the transformer blocks (not the LM head).

    Layers whose weights did not change are left out (a LoRA run that targets only some layers).
    """
    base_linears = {n: m for n, m in base_model.named_modules() if isinstance(m, nn.Linear)}
    deltas = {}
    with torch.no_grad():
        for name, module in merged_model.named_modules():
            if not isinstance(module, nn.Linear) or _BLOCK.search(f".{name}.") is None:
                continue
            base = base_linears.get(name)
            if base is None or base.weight.shape != module.weight.shape:
                raise MoraTrainError(
                    f"merged model layer {name} has no counterpart of the same shape in the base model; "
                    "is --base-model the model this run started from?"
                )
            delta = module.weight.float() - base.weight.float()
            if delta.abs().max().item() > 0:
                deltas[name] = delta
    if not deltas:
        raise MoraTrainError("the merged model equals the base model in every block layer: nothing was trained")
    return deltas


def load_base_model(model_cfg: ModelConfig) -> PreTrainedModel:
    from mora_train.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_cfg)
    return model.float().eval()


def run_model_config(run_dir: Path) -> ModelConfig:
    saved = saved_run_config(run_dir)
    if saved is None:
        raise MoraTrainError(
            f"{run_dir} has no resolved_config.yaml; pass --base-model to say which model it started from"
        )
    return saved.model


def run_spectrum(path: str | Path, base_model: str | None = None) -> tuple[list[LayerSpectrum], str]:
    """Spectra of ΔW for a run dir, an adapter folder or a merged-model folder; and which source was used.

    A run dir uses its adapter/ (lora, mora) or merged/ minus the base (full fine-tuning); its base
    model comes from its resolved_config.yaml unless base_model names one.
    """
    path = Path(path)
    if (path / "resolved_config.yaml").is_file() or (path / "metrics.json").is_file():
        model_cfg = named_model_config(base_model) if base_model else run_model_config(path)
        if (path / "adapter").is_dir():
            return singular_values(adapter_deltas(load_base_model(model_cfg), path / "adapter")), "adapter"
        if (path / "merged").is_dir():
            return _merged_vs_base(path / "merged", model_cfg), "merged - base"
        raise MoraTrainError(f"run dir {path} has neither adapter/ nor merged/: did the run finish?")
    if base_model is None:
        raise MoraTrainError(f"{path} is not a run dir; pass --base-model (config name, hub id or folder) for its base")
    model_cfg = named_model_config(base_model)
    if (path / "adapter_config.json").is_file():
        return singular_values(adapter_deltas(load_base_model(model_cfg), path)), "adapter"
    if (path / "config.json").is_file():
        return _merged_vs_base(path, model_cfg), "merged - base"
    raise MoraTrainError(
        f"{path} is neither a run dir, an adapter folder (adapter_config.json) nor a model folder (config.json)"
    )


def _merged_vs_base(merged_dir: Path, model_cfg: ModelConfig) -> list[LayerSpectrum]:
    from transformers import AutoModelForCausalLM

    from mora_train.models import load_error

    try:
        merged = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - the loading boundary: corrupt weights, not a model, ...
        raise load_error("model", str(merged_dir), err, "path") from None
    return singular_values(merged_deltas(load_base_model(model_cfg), merged))


# -- cache, summary, plot -----------------------------------------------------------------------------


def save_spectra(spectra: list[LayerSpectrum], path: Path, source: str) -> None:
    from safetensors.torch import save_file

    tensors = {s.name: s.singular_values.contiguous() for s in spectra}
    metadata = {"source": source, "shapes": ";".join(f"{s.name}={s.d_out}x{s.d_in}" for s in spectra)}
    write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_spectra(path: Path) -> tuple[list[LayerSpectrum], str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = dict(item.split("=") for item in metadata.get("shapes", "").split(";") if item)
        spectra = []
        for name in f.keys():  # noqa: SIM118 - safe_open has keys() but no __iter__
            d_out, d_in = (int(v) for v in shapes.get(name, "0x0").split("x"))
            spectra.append(LayerSpectrum(name, d_out, d_in, f.get_tensor(name)))
    spectra.sort(key=_layer_order)
    return spectra, metadata.get("source", "unknown")


def _layer_order(spectrum: LayerSpectrum) -> tuple:
    return (spectrum.block if spectrum.block is not None else -1, spectrum.name)


def cached_run_spectrum(run_dir: Path, refresh: bool = False) -> tuple[list[LayerSpectrum], str]:
    """run_spectrum(run_dir), computed once and then read from RUN_DIR/spectrum.safetensors."""
    cache = Path(run_dir) / SPECTRUM_FILE
    if cache.is_file() and not refresh:
        return load_spectra(cache)
    spectra, source = run_spectrum(run_dir)
    spectra.sort(key=_layer_order)
    save_spectra(spectra, cache, source)
    return spectra, source


def summarize(spectra: list[LayerSpectrum], threshold: float) -> dict[str, float | int]:
    counts = [s.count_above(threshold) for s in spectra]
    return {
        "layers": len(counts),
        "mean": sum(counts) / len(counts) if counts else 0.0,
        "min": min(counts, default=0),
        "max": max(counts, default=0),
    }


def per_block_mean(spectra: list[LayerSpectrum], threshold: float) -> dict[int, float]:
    """Block index -> mean count above threshold over that block's adapted layers."""
    sums: dict[int, list[int]] = {}
    for s in spectra:
        if s.block is not None:
            sums.setdefault(s.block, []).append(s.count_above(threshold))
    return {b: sum(c) / len(c) for b, c in sorted(sums.items())}


def plot_spectrum(
    spectra: list[LayerSpectrum], threshold: float, path: Path, title: str, rank_line: int | None = None
) -> None:
    """One line per layer kind (q_proj, ...): singular values > threshold against block index."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for i, s in enumerate(spectra):
        by_kind.setdefault(s.kind, []).append((s.block if s.block is not None else i, s.count_above(threshold)))
    for kind, points in sorted(by_kind.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=kind)
    if rank_line:
        ax.axhline(rank_line, color="grey", linestyle="--", linewidth=1, label=f"rank {rank_line}")
    ax.set_xlabel("transformer block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"singular values of ΔW > {threshold:g}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically (readers never see half a PNG) and free the figure."""
    fig.tight_layout()
    save_figure_atomically(fig, path)


# -- command line ---------------------------------------------------------------------------------

RUN_OUTPUTS = ("adapter", "merged", "merged-unverified", "checkpoints")


def is_earlier_spectrum(folder: Path) -> bool:
    """A folder whose spectrum.safetensors this command wrote (save_spectra records the layer shapes)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(folder) / SPECTRUM_FILE), framework="pt") as f:
            return "shapes" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - missing, not safetensors, unreadable: not ours
        return False


def check_spectrum_target(out: str | None, path: Path, is_run: bool, base_model: str | None) -> Path:
    """--out (default: the run dir, where the cache lives, else the current folder), checked before loading."""
    target = out if out is not None else (path if is_run else Path.cwd())
    read = [path / name for name in RUN_OUTPUTS] if is_run else [path]
    home = Path(path).resolve() if is_run else None
    return check_output_target(
        target,
        "mora-train-spectrum",
        "--out",
        FILES,
        [*read, base_model],
        ours=lambda folder: Path(folder).resolve() == home or is_earlier_spectrum(folder),
        names=(SPECTRUM_FILE, SPECTRUM_PLOT),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mora-train-spectrum",
        description="Count the singular values of ΔW above a threshold, per layer (paper Fig. 5).",
    )
    parser.add_argument("path", help="a run dir, an adapter folder, or a merged-model folder")
    parser.add_argument(
        "--base-model",
        help="base model: config name (smollm2-135m, tiny-llama), hub id or folder; "
        "default: the run's own (resolved_config.yaml)",
    )
    parser.add_argument(
        "--threshold", type=non_negative_float, default=DEFAULT_THRESHOLD, help="default %(default)s (the paper's)"
    )
    parser.add_argument(
        "--out", help="folder for spectrum.png/.safetensors (default: the run dir, else the current dir)"
    )
    parser.add_argument("--refresh", action="store_true", help="recompute even if the run dir has a cached spectrum")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    path = Path(args.path)
    try:
        is_run = (path / "resolved_config.yaml").is_file()
        refuse_if_being_written(path, "PATH", "mora-train-spectrum")
        out = check_spectrum_target(args.out, path, is_run, args.base_model)
        if is_run and args.base_model is None:
            spectra, source = cached_run_spectrum(path, refresh=args.refresh)
        else:
            spectra, source = run_spectrum(path, args.base_model)
            spectra.sort(key=_layer_order)
    except MoraTrainError as err:
        print(f"mora-train-spectrum: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Exception as err:  # noqa: BLE001 - a bug: one line and the traceback in a file, never a bare traceback
        report_unexpected("mora-train-spectrum", err, None)
        return 1
    try:
        out.mkdir(parents=True, exist_ok=True)
        if out != path or not is_run:
            save_spectra(spectra, out / SPECTRUM_FILE, source)
        plot_spectrum(spectra, args.threshold, out / SPECTRUM_PLOT, f"{path.name}: ΔW ({source})")
    except OSError as err:
        print(
            f"mora-train-spectrum: error: cannot write the spectrum into {out}: {err.strerror or err} "
            f"({err.filename or out}); choose a writable folder with --out DIR",
            file=sys.stderr,
        )
        return 2
    print(f"{'layer':<48} {'shape':>11} {'> ' + format(args.threshold, 'g'):>8} {'max sv':>9}")
    for s in spectra:
        top = s.singular_values[0].item() if s.singular_values.numel() else 0.0
        print(f"{s.name:<48} {f'{s.d_out}x{s.d_in}':>11} {s.count_above(args.threshold):>8} {top:>9.4f}")
    summary = summarize(spectra, args.threshold)
    print(
        f"{summary['layers']} layers, ΔW from {source}: singular values > {args.threshold:g} per layer "
        f"mean {summary['mean']:.1f}, min {summary['min']}, max {summary['max']}   "
        f"plot: {out / SPECTRUM_PLOT}   ({time.time() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
