"""core.io: atomic writes leave the old content or the new one, never half of one, and no debris."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mora_train.core.io import (
    save_figure_atomically,
    write_dir_atomically,
    write_file_atomically,
    write_json_atomically,
    write_text_atomically,
)


def test_text_and_json_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_text_atomically(path, "old")
    write_json_atomically(path, {"a": 1, "p": Path("x")}, default=str)
    assert json.loads(path.read_text()) == {"a": 1, "p": "x"} and path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        write_file_atomically(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_dir_is_replaced_whole_or_kept_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("1"))
    write_dir_atomically(target, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    write_dir_atomically(target, lambda d: (d / "c.txt").write_text("3"), keep_existing=True)  # another process won
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):
        write_dir_atomically(target, lambda d: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_figure_is_saved_and_closed(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure_atomically(fig, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
