"""Spectrum of the weight update ΔW (paper Fig. 5): per layer, how many singular values exceed a threshold.

LoRA's ΔW = (alpha/r) B A has rank at most r, so its count never exceeds r; MoRA's square matrix
can reach rank r̂, full fine-tuning any rank. ΔW comes from either

* an adapter folder re-attached to its base model (`Adapter.delta_weights()`, exact, fp32), or
* a merged model minus its base model, weight by weight (any run, full fine-tuning included).

Singular values are computed once per run and cached in RUN_DIR/spectrum.safetensors, so a report
can recount them at any threshold for free. The command (mora_train.cli.spectrum):

    mora-train-spectrum RUN_DIR [--threshold 0.1]
    mora-train-spectrum ADAPTER_DIR --base-model smollm2-135m
    mora-train-spectrum MERGED_DIR --base-model /path/to/base --threshold 0.05

A run still being written (its run-dir lock) is refused. --out never lies inside what is read (a run's
adapter/, merged/ or checkpoints/, an adapter or model folder) and never overwrites spectrum files this
command did not write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mora_train.core.errors import MoraTrainError
from mora_train.core.io import save_figure_atomically, write_file_atomically
from mora_train.core.outputs import FILES, check_output_target
from mora_train.core.run_dir import RunDir
from mora_train.export.delta import BLOCK_INDEX, adapter_deltas, load_merged, merged_deltas
from mora_train.models.config import ModelConfig
from mora_train.pipeline.run_config import named_model_config, saved_run_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1  # the paper's Fig. 5 counts singular values > 0.1
SPECTRUM_FILE = "spectrum.safetensors"
SPECTRUM_PLOT = "spectrum.png"


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
        match = BLOCK_INDEX.search(f".{self.name}.")
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


# -- where ΔW comes from ------------------------------------------------------------------------------


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

    A run dir uses its adapter/ (lora, mora) or merged/ minus the base (full fine-tuning, and runs with restarts,
    whose adapter/ holds only the last cycle's update); its base model comes from its resolved_config.yaml unless
    base_model names one.
    """
    path = Path(path)
    run = RunDir(path)
    if run.resolved_config.is_file() or run.metrics.is_file():
        model_cfg = named_model_config(base_model) if base_model else run_model_config(path)
        saved = saved_run_config(path)
        if saved is not None and saved.trainer.restart.every_steps > 0 and run.merged.is_dir():
            return _merged_vs_base(run.merged, model_cfg), "merged - base (a run with restarts)"
        if run.adapter.is_dir():
            return singular_values(adapter_deltas(load_base_model(model_cfg), run.adapter)), "adapter"
        if run.merged.is_dir():
            return _merged_vs_base(run.merged, model_cfg), "merged - base"
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
    merged = load_merged(merged_dir, model_cfg.trust_remote_code)
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
    spectra.sort(key=layer_order)
    return spectra, metadata.get("source", "unknown")


def layer_order(spectrum: LayerSpectrum) -> tuple:
    return (spectrum.block if spectrum.block is not None else -1, spectrum.name)


def cached_run_spectrum(run_dir: Path, refresh: bool = False) -> tuple[list[LayerSpectrum], str]:
    """run_spectrum(run_dir), computed once and then read from RUN_DIR/spectrum.safetensors."""
    cache = Path(run_dir) / SPECTRUM_FILE
    if cache.is_file() and not refresh:
        return load_spectra(cache)
    spectra, source = run_spectrum(run_dir)
    spectra.sort(key=layer_order)
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


# -- where the command writes ---------------------------------------------------------------------------


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
    read = [path / name for name in RunDir.OUTPUTS] if is_run else [path]
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
