"""`mora-train` command: Hydra composes the config, the pipeline does the work.

Returns the task's primary metric, so Hydra sweepers (e.g. Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mora_train.distributed import MainProcessFailed, is_main_process, prepare_cli, rank, shutdown
from mora_train.errors import MoraTrainError


def config_dir() -> str:
    """configs/ of the source checkout (mora-train is installed editable: `pip install -e .`)."""
    path = Path(__file__).resolve().parent.parent / "configs"
    if not (path / "config.yaml").is_file():
        sys.exit(f"mora-train: error: no configs/config.yaml beside the package ({path}); install with `pip install -e .`")
    return str(path)


def _run(cfg: DictConfig) -> float | None:
    from mora_train.pipeline import run

    try:
        metrics = run(cfg)
    except MainProcessFailed:
        sys.exit(2)  # a rank != 0: rank 0 has printed the error
    except MoraTrainError as err:
        logging.getLogger("mora_train").debug("user error", exc_info=True)
        where = "" if is_main_process() else f" (rank {rank()})"
        print(f"\nmora-train: error{where}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    primary = metrics.get(metrics["primary_metric"])
    if not is_main_process():
        return primary
    print(
        f"\nmerged model: {Path(cfg.output_dir, 'merged').resolve()}\n"
        f"{metrics['primary_metric']}: {primary:.4f}   exact_match: {metrics.get('exact_match', float('nan')):.4f}   "
        f"train_loss: {metrics['train_loss']:.4f}   merge_max_abs_diff: {metrics['merge_max_abs_diff']:.2e}   "
        f"wall time: {metrics['wall_time_s']:.0f} s",
        flush=True,
    )
    return primary


def main() -> None:
    # Under a multi-process launcher: join the process group and agree on the run dir before Hydra runs.
    sys.argv = [sys.argv[0], *prepare_cli(sys.argv[1:])]
    try:
        hydra.main(version_base=None, config_path=config_dir(), config_name="config")(_run)()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
