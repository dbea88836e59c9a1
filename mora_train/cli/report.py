"""`mora-train-report SWEEP_DIR [--threshold 0.1] [--no-spectrum] [--out DIR]`: a sweep dir as report.md,
report.csv and PNG plots (mora_train.analysis.report); runs that differ only by seed are also summarized per
configuration (mean, sd, n, 95 % interval: report_seeds.csv)."""

from __future__ import annotations

import argparse
import logging
import sys

from mora_train.analysis.report import build_report
from mora_train.analysis.spectrum import DEFAULT_THRESHOLD
from mora_train.core.errors import MoraTrainError, non_negative_float, report_unexpected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mora-train-report",
        description="Turn a sweep dir (mora-train -m ...) into report.md, report.csv and PNG plots.",
    )
    parser.add_argument("sweep_dir", help="the multirun folder (multirun/DATE/TIME), or any folder holding runs")
    parser.add_argument("--out", help="where to write the report (default: the sweep dir)")
    parser.add_argument(
        "--threshold",
        type=non_negative_float,
        default=DEFAULT_THRESHOLD,
        help="count singular values of ΔW above this (default %(default)s, the paper's)",
    )
    parser.add_argument(
        "--no-spectrum", action="store_true", help="skip the ΔW spectrum (it loads each run's base model)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = build_report(args.sweep_dir, args.out, args.threshold, spectrum=not args.no_spectrum)
    except MoraTrainError as err:
        print(f"mora-train-report: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # the report folder cannot be written (read-only, a file, full disk)
        print(
            "mora-train-report: error: cannot write the report "
            f"({err.strerror or err}: {err.filename or args.out or args.sweep_dir}); "
            "choose a writable folder with --out DIR",
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line and the traceback in a file, never a bare traceback
        report_unexpected("mora-train-report", err, None)
        return 1
    failed = sum(not r.ok and not r.running for r in report.runs)
    running = sum(r.running for r in report.runs)
    seeded = sum(group.n > 1 for group in report.groups)
    configurations = f"; {len(report.groups)} configurations, {seeded} with several seeds" if seeded else ""
    print(
        f"{len(report.runs)} runs ({failed} failed{f', {running} still running' if running else ''}{configurations}): "
        f"{report.markdown_path}, {report.csv_path}" + "".join(f", {p.name}" for p in report.plots.values())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
