"""run_on_main_process, launch-time agreement and prepare_cli with two real processes (gloo, no model)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

# Two processes of its own: one such test at a time (tests/conftest.py), and not in the inner loop.
pytestmark = [pytest.mark.multiprocess, pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    from mora_train.core.errors import MoraTrainError
    from mora_train.training import distributed

    result: dict = {"argv": distributed.prepare_cli(["adapter=lora", "--local_rank=0"])}
    result["launch_time"] = distributed.launch_time().isoformat()
    ran_on = []
    result["value"] = distributed.run_on_main_process(lambda: ran_on.append(rank) or f"made by rank {rank}")
    result["ran_on"] = ran_on

    def fail() -> None:
        raise MoraTrainError("bad value: fix it")

    try:
        distributed.run_on_main_process(fail)
    except distributed.MainProcessFailed as err:
        result["failure"] = ["MainProcessFailed", str(err)]
    except MoraTrainError as err:
        result["failure"] = ["MoraTrainError", str(err)]
    result["checksums"] = distributed.all_gather_object(f"from {rank}")
    distributed.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_rank0_runs_alone_and_the_others_share_its_result_or_its_failure(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["launch_time"] == r1["launch_time"]  # the same dated run dir on every rank
    assert r0["argv"] == ["adapter=lora"]  # rank 0's Hydra writes .hydra/ and the job log as usual
    assert r1["argv"][0] == "adapter=lora" and "hydra.output_subdir=null" in r1["argv"]
    assert "hydra/job_logging=stdout" in r1["argv"] and "hydra.job_logging.root.level=WARNING" in r1["argv"]
    assert r0["ran_on"] == [0] and r1["ran_on"] == []
    assert r0["value"] == r1["value"] == "made by rank 0"
    assert r0["failure"] == ["MoraTrainError", "bad value: fix it"]  # rank 0 reports the error itself
    assert r1["failure"] == ["MainProcessFailed", "rank 0 failed: bad value: fix it"]  # the CLI exits quietly on it
    assert r0["checksums"] == r1["checksums"] == ["from 0", "from 1"]
