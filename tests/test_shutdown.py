"""A launcher ended mid-run — SIGTERM, Ctrl-C, its parent's death, or SIGKILL (then its watchdog)
— stops the run before its processes, leaves no process (and no unreaped zombie) behind, and
records no round after the stop. The seconds it takes are figures of `python -m benchmarks.shutdown`."""

import pytest

from benchmarks.shutdown import end_mid_run

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("launcher", "way"), [("run", "int"), ("run", "parent"), ("cluster", "term"), ("cluster", "kill")]
)
def test_a_launcher_ended_mid_run_leaves_nothing_and_records_no_round_after(
    launcher, way, tmp_path, hub_mirror
):
    one_actor = ["--cpus-per-client", "2"] if launcher == "run" else []  # each Ray actor imports the stack
    ending = end_mid_run(launcher, way, tmp_path, str(hub_mirror), extra=one_actor)
    assert ending.left == [], ending
    assert ending.rounds_after == ending.rounds_before == [0, 1], ending  # round 2 was under way
    assert ending.vanished_rounds == [], ending  # no round in which every node had gone
