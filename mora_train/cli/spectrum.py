"""`mora-train-spectrum PATH [--base-model M] [--threshold 0.1] [--out DIR] [--refresh]`: per layer, how many
singular values of ΔW exceed the threshold (paper Fig. 5), as a table, a plot and a cache
(mora_train.analysis.spectrum)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mora_train.analysis.spectrum import (
    DEFAULT_THRESHOLD,
    SPECTRUM_FILE,
    SPECTRUM_PLOT,
    LayerSpectrum,
    cached_run_spectrum,
    check_spectrum_target,
    layer_order,
    plot_spectrum,
    run_spectrum,
    save_spectra,
    summarize,
)
from mora_train.core.errors import MoraTrainError, non_negative_float, report_unexpected
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import refuse_if_being_written


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    path = Path(args.path)
    try:
        is_run = RunDir(path).resolved_config.is_file()
        refuse_if_being_written(path, "PATH", "mora-train-spectrum")
        out = check_spectrum_target(args.out, path, is_run, args.base_model)
        if is_run and args.base_model is None:
            spectra, source = cached_run_spectrum(path, refresh=args.refresh)
        else:
            spectra, source = run_spectrum(path, args.base_model)
            spectra.sort(key=layer_order)
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
    _print_counts(spectra, source, args.threshold, out, started)
    return 0


def _print_counts(spectra: list[LayerSpectrum], source: str, threshold: float, out: Path, started: float) -> None:
    """One line per layer (shape, count above the threshold, largest singular value), then the summary."""
    print(f"{'layer':<48} {'shape':>11} {'> ' + format(threshold, 'g'):>8} {'max sv':>9}")
    for s in spectra:
        top = s.singular_values[0].item() if s.singular_values.numel() else 0.0
        print(f"{s.name:<48} {f'{s.d_out}x{s.d_in}':>11} {s.count_above(threshold):>8} {top:>9.4f}")
    summary = summarize(spectra, threshold)
    print(
        f"{summary['layers']} layers, ΔW from {source}: singular values > {threshold:g} per layer "
        f"mean {summary['mean']:.1f}, min {summary['min']}, max {summary['max']}   "
        f"plot: {out / SPECTRUM_PLOT}   ({time.time() - started:.1f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
