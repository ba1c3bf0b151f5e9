"""Resume equals uninterrupted with real processes: `flwr run` on the simulation runtime, the
ServerApp (the `flwr-simulation` process, with its Ray workers) SIGKILLed once round 2's checkpoint
is on disk, then the run folder resumed as a new Flower run with new node ids."""

import json
import signal
import time

import numpy as np
import psutil
import pytest
from conftest import TINY_OVERRIDES
from safetensors.numpy import load_file

from launch.simulation import COMPLETED, CONNECTION, PROJECT_DIR, LocalSuperLink
from server_app.checkpoint import round_folders

pytestmark = pytest.mark.e2e
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
ROUNDS = 4
EXTRA = {"hetlora": ["method.prune_gamma=0.5", "method.prune_lambda=1.0"]}  # it prunes in the run


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = LocalSuperLink(tmp_path_factory.mktemp("flwr-home"))
    link.start()
    yield link
    link.stop()


def _overrides(method):
    return " ".join([*TINY_OVERRIDES, f"federation.num_rounds={ROUNDS}", *EXTRA.get(method, [])])


def _submit(superlink, hub_mirror, output, method):
    line = (
        f"method='{method}' model='tiny_bert' output-dir='{output}' hub-mirror='{hub_mirror}' "
        f"overrides='{_overrides(method)}'"
    )
    return superlink.submit(PROJECT_DIR, [line], FEDERATION)


def _simulation_processes(superlink):
    """The ServerApp processes the SuperLink started, with everything under them (Ray)."""

    def is_serverapp(process):
        try:
            return "flwr-simulation" in " ".join(process.cmdline())
        except psutil.Error:
            return False

    runs = [p for p in psutil.Process(superlink.process.pid).children(recursive=True) if is_serverapp(p)]
    return [tree for p in runs for tree in (p, *p.children(recursive=True))]


def _kill_after_checkpoint(superlink, output, round_, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = list(output.iterdir()) if output.exists() else []
        if folders and any(int(p.name[6:]) >= round_ for p in round_folders(folders[0])):
            processes = _simulation_processes(superlink)
            for process in processes:
                process.send_signal(signal.SIGKILL)
            psutil.wait_procs(processes, timeout=30)
            return folders[0]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of round {round_} within {timeout} s")


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _eval(rows):
    return [{k: v for k, v in r.items() if k.startswith("eval_") and k != "eval_seconds"} for r in rows]


# private client state on the nodes' disks, server state with per-client ranks; a merged base
# (FLoRA) with `make test-all` (its resync is covered in process by test_resume.py, as is FedIT's
# stateless resume)
@pytest.mark.parametrize(
    "method", ["fedsa_lora", pytest.param("flora", marks=pytest.mark.exhaustive), "hetlora"]
)
def test_a_killed_server_resumes_to_the_uninterrupted_result(superlink, hub_mirror, tmp_path, method):
    whole_id = _submit(superlink, hub_mirror, tmp_path / "whole", method)
    assert superlink.follow(whole_id, timeout=600, stream=False).status == COMPLETED
    (whole,) = (tmp_path / "whole").iterdir()

    killed_id = _submit(superlink, hub_mirror, tmp_path / "killed", method)
    folder = _kill_after_checkpoint(superlink, tmp_path / "killed", 2)
    superlink.flwr("stop", str(killed_id), CONNECTION)  # the SuperLink's record of the dead run
    assert not (folder / "summary.json").exists()

    resumed_id = superlink.submit(
        PROJECT_DIR, [f"resume-from='{folder}' hub-mirror='{hub_mirror}'"], FEDERATION
    )
    outcome = superlink.follow(resumed_id, timeout=600, stream=False)
    assert outcome.status == COMPLETED, outcome
    rows, reference = _rows(folder), _rows(whole)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert _eval(rows) == _eval(reference)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference]
    for saved in ("adapter", "model"):
        for file in (whole / saved).glob("*.safetensors"):
            expected, got = load_file(str(file)), load_file(str(folder / saved / file.name))
            assert expected.keys() == got.keys()
            assert all(np.array_equal(expected[k], got[k]) for k in expected), file.name
