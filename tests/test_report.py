"""The benchmark report from run records: hand-computed means, gaps, overheads and claims; plots."""

import json
import math

import pytest

from benchmarks.report import (
    framework_overhead,
    grouped,
    main,
    makespan,
    method_rows,
    transport_ratios,
    wire_overhead,
)
from benchmarks.results import merge_records, read_records, run_record
from benchmarks.stats import Verdict


def _record(method, seed, finals, dataset="sst2", partition="dirichlet", up=100.0, seconds=(10.0, 4.0, 12.0)):
    rounds = [{"round": 0, "metric": 0.5, "bytes_down": 0, "bytes_up": 0}]
    wall, slowest, total = seconds
    for i, metric in enumerate(finals, start=1):
        rounds.append(
            {
                "round": i, "metric": metric, "bytes_down": 200.0, "bytes_up": up,
                "clients_aggregated": 0 if method == "centralized" else 5,
                "payload_bytes_down": 190.0, "payload_bytes_up": up * 0.95,
                "train_phase_seconds": wall, "slowest_client_seconds": slowest,
                "client_seconds_total": total, "peak_client_memory_mb": 900.0 + seed,
            }
        )  # fmt: skip
    return {
        "job": f"{method}-{dataset}-{partition}-s{seed}", "method": method, "model": "minilm",
        "dataset": dataset, "partition": partition, "seed": seed, "main_metric": "accuracy",
        "num_clients": 10, "wall_seconds": 100.0 + seed, "commit": "abc", "rounds": rounds,
        "lr": 1e-3 if method in ("centralized", "full") else 5e-3,
    }  # fmt: skip


RECORDS = [
    _record("centralized", 0, [0.80, 0.86]),
    _record("centralized", 1, [0.80, 0.84]),
    _record("fedit", 0, [0.70, 0.80]),
    _record("fedit", 1, [0.75, 0.82]),
    _record("ffa_lora", 0, [0.70, 0.81], up=50.0),
    _record("ffa_lora", 1, [0.70, 0.81], up=50.0),
    _record("full", 0, [0.60, 0.70]),
]


def test_rows_hold_hand_computed_means_gaps_and_bytes():
    rows = {r.method: r for r in method_rows(grouped(RECORDS), parallel=2)[("sst2", "dirichlet")]}
    assert rows["fedit"].final == pytest.approx((0.81, 0.0141421356))
    assert rows["fedit"].best == pytest.approx((0.81, 0.0141421356))
    assert rows["fedit"].gap == pytest.approx(0.81 - 0.85)
    assert rows["fedit"].mb_up == pytest.approx(2 * 100.0 / 10 / 1e6)
    assert rows["ffa_lora"].mb_up == pytest.approx(rows["fedit"].mb_up / 2)
    assert rows["fedit"].peak_mb == 901.0 and rows["full"].seeds == 1
    assert rows["centralized"].framework is None  # no federated round to time
    assert rows["fedit"].framework_later == pytest.approx(10.0 / 6.0)  # round 2 alone


def test_overheads():
    record = RECORDS[2]
    assert framework_overhead(record, parallel=2) == pytest.approx(10.0 / 6.0)  # max(4, 12 / 2)
    assert framework_overhead(record, parallel=4) == pytest.approx(10.0 / 4.0)  # the slowest client bounds it
    assert wire_overhead(record) == pytest.approx(600.0 / (380.0 + 190.0))
    assert makespan([5, 5, 5, 5, 5], 2) == 15  # three waves of two workers
    assert makespan([8, 3, 3, 2], 2) == 8 and makespan([4], 3) == 4
    timed = {
        **record,
        "rounds": [record["rounds"][0], {**record["rounds"][1], "client_seconds": [4.0, 4.0, 4.0]}],
    }
    assert framework_overhead(timed, parallel=2) == pytest.approx(10.0 / 8.0)
    handled = {
        **timed,
        "rounds": [*timed["rounds"], {**timed["rounds"][1], "client_handler_seconds": [5.0] * 3}],
    }
    assert transport_ratios(handled, parallel=2) == pytest.approx([10.0 / 10.0])  # round 1 has none


def test_report_command_writes_table_plots_and_claims(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["--results", str(tmp_path / "none"), "--out", str(out), "--preset", "test"]) == 0
    text = (out / "report.md").read_text()
    assert "| `fedit` | 2 | 81.0 ± 1.4 | 81.0 ± 1.4 | -4.0 | 0.0 / 0.0 |" in text
    assert "Peak learning rates: `centralized` 0.001, `fedit` 0.005, `ffa_lora` 0.005, `full` 0.001." in text
    assert "FFA-LoRA**: freezing A matches FedIT with half the upload" in text
    # two paired seeds: differences +1 and -1 pp, t_{0.975, 1} = 12.706 → ±12.7 pp
    assert (
        "not resolved — ffa_lora 81.0 vs fedit 81.0: paired difference ±0.0 [-12.7, +12.7] pp over 2 seeds; "
        "upload ratio 0.50" in text
    )
    assert "| `ffa_lora` | 2 | 81.0 ± 0.0 | ±0.0 [-12.7, +12.7] not resolved |" in text
    assert "- **sst2 / dirichlet**: not resolved — `fedit` leads `ffa_lora`" in text
    assert "**did not hold** — full 70.0 vs fedit 81.0" in text  # full did not beat LoRA here
    assert (out / "sst2-dirichlet.png").stat().st_size > 10_000
    # per run: round 1 and rounds 2+ (10 / max(4, 12 / 2)), MB per round 300 / 285 bytes
    assert (
        "| `fedit-sst2-dirichlet-s0` | 2 | 1.67 | 1.67 (1.67) | 0.00 / 0.00 | not recorded | 1.053 |" in text
    )
    assert "`centralized-sst2-dirichlet-s0` |" not in text.split("## Efficiency per run")[1]


def test_records_from_a_run_folder_and_merging(tmp_path):
    run = tmp_path / "fedit-sst2-iid-s1" / "run"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps({"status": "completed", "main_metric": "accuracy", "method": "fedit", "model": "minilm",
                    "dataset": "sst2", "partition": "iid", "num_clients": 10, "wall_seconds": 5.0})
    )  # fmt: skip
    (run / "config.yaml").write_text("train:\n  local_steps: 10\n  lr: 0.005\nmethod:\n  lr: null\n")
    rows = [
        {"round": 0, "eval_accuracy": 0.5, "eval_loss": 0.7},
        {"round": 1, "eval_accuracy": 0.6, "bytes_up": 3},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = run_record(run, "fedit-sst2-iid-s1", 1, "abc")
    assert [r["metric"] for r in record["rounds"]] == [0.5, 0.6] and record["local_steps"] == 10
    assert record["lr"] == 0.005
    assert "/" not in json.dumps({k: v for k, v in record.items() if k != "job"}).replace("\\/", "")
    merged = merge_records([dict(record, seed=9)], [record])
    assert merged == [record]
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert run_record(run, "x", 1) is None
    assert read_records(tmp_path / "missing.jsonl") == []


def _with_chance(record, examples=100, rate=0.5):
    return {**record, "chance": {"eval_examples": examples, "majority_rate": rate}}


def test_chance_level_marks_rows_and_makes_claims_inconclusive(tmp_path):
    records = [
        _with_chance(_record("centralized", 0, [0.80, 0.86])),
        _with_chance(_record("fedit", 0, [0.50, 0.59])),  # 0.59 - 0.5 < 2 * sqrt(.59 * .41 / 100) = 0.098
        _with_chance(_record("ffa_lora", 0, [0.50, 0.52], up=50.0)),
        _with_chance(_record("flexlora", 0, [0.50, 0.70])),
        _with_chance(_record("fedsa_lora", 0, [0.80, 0.90]), rate=0.75),
    ]
    rows = {r.method: r for r in method_rows(grouped(records), parallel=2)[("sst2", "dirichlet")]}
    assert rows["fedit"].at_chance and rows["ffa_lora"].at_chance and not rows["flexlora"].at_chance
    assert rows["fedit"].noise == pytest.approx(math.sqrt(0.59 * 0.41 / 100))  # one seed: sampling error
    assert rows["fedsa_lora"].chance == 0.75 and not rows["fedsa_lora"].at_chance  # 0.15 > 2 * 0.03
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--results", str(tmp_path / "none"), "--out", str(out), "--preset", "test"]) == 0
    text = (out / "report.md").read_text()
    assert "| `fedit` | 1 | 59.0 ± 0.0 ° |" in text and "| `flexlora` | 1 | 70.0 ± 0.0 |" in text
    assert "scores 50.0 % of the 100 evaluation examples (`fedsa_lora`: 75.0 % of its clients' own" in text
    assert "inconclusive (both at chance) — ffa_lora 52.0 vs fedit 59.0 (± 5.0)" in text
    assert "held — flexlora 70.0 vs fedit 59.0 (± 4.9)" in text  # one side learned: a verdict
    assert "| not comparable |" in text
    assert "sst2/dirichlet: 90.0 vs 75.0 (± 3.0): +15.0 pp of learning beyond it" in text


def test_a_lower_mean_that_holds_only_within_the_noise_says_so():
    from benchmarks.report import _at_least

    records = [_with_chance(_record("fedit", 0, [0.5, 0.80])), _with_chance(_record("flora", 0, [0.5, 0.78]))]
    rows = {r.method: r for r in method_rows(grouped(records), parallel=2)[("sst2", "dirichlet")]}
    held, words = _at_least("flora", "fedit")(rows)  # -2 pp, noise sqrt(.78 * .22 / 100) = 4.1 pp
    assert held is Verdict.HELD and words.endswith("(± 4.1); lower, but within the noise")
    held, words = _at_least("fedit", "flora")(rows)
    assert held is Verdict.HELD and words.endswith("(± 4.1)")


def test_chance_level_of_a_run_from_the_mirror(tiny_cfg):
    import numpy as np
    import pandas as pd
    import yaml

    from benchmarks.results import chance_level
    from finetune.data import load_eval_split
    from finetune.hub import hub_mirror

    config = yaml.safe_load(tiny_cfg.to_yaml())
    level = chance_level(config)
    labels = pd.Series(load_eval_split(tiny_cfg.dataset, hub_mirror(tiny_cfg.hub_mirror), 0)["label"])
    assert level == {"eval_examples": 64, "majority_rate": labels.value_counts().max() / 64}
    personal = chance_level({**config, "method": {**config["method"], "name": "fedsa_lora"}})
    assert personal["eval_examples"] == 64 and personal["majority_rate"] > level["majority_rate"]
    assert chance_level({"train": {}}) is None
    config["dataset"]["max_eval_examples"] = 10  # another subset: computed anew, not a cached answer
    assert chance_level(config)["eval_examples"] == 10
    assert np.isclose(level["majority_rate"] * 64, round(level["majority_rate"] * 64))


def test_partition_independent_centralized_row_is_repeated_in_other_partitions(tmp_path):
    records = [*RECORDS, _record("fedit", 0, [0.70, 0.83], partition="iid")]
    table = method_rows(grouped(records), parallel=2)
    iid = {r.method: r for r in table[("sst2", "iid")]}
    assert iid["centralized"].borrowed_from == "dirichlet" and iid["centralized"].final[0] == pytest.approx(
        0.85
    )
    assert iid["fedit"].gap == pytest.approx(0.83 - 0.85)
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--results", str(tmp_path / "none"), "--out", str(out), "--preset", "test"]) == 0
    text = (out / "report.md").read_text().split("## sst2 / iid")[1]
    assert "| `centralized` (the dirichlet runs) | 2 | 85.0 ± 1.4 |" in text
    assert "| `fedit` | 1 | 83.0 ± 0.0 | 83.0 ± 0.0 | -2.0 |" in text


def test_five_paired_seeds_resolve_a_claim_and_the_guide_names_the_winner(tmp_path):
    records = [
        r
        for seed in range(5)
        for r in (
            _record("fedit", seed, [0.7, 0.80 + 0.01 * seed]),
            _record("full", seed, [0.7, 0.85 + 0.01 * seed + 0.002 * (seed % 2)]),
        )
    ]
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--results", str(tmp_path / "none"), "--out", str(out), "--preset", "test"]) == 0
    text = (out / "report.md").read_text()
    # differences 5.0, 5.2, 5.0, 5.2, 5.0 pp: mean 5.08, s = 0.1095, t_{0.975, 4} s / sqrt 5 = 0.136
    assert "full 87.1 vs fedit 82.0: paired difference +5.1 [+4.9, +5.2] pp over 5 seeds" in text
    assert "sst2/dirichlet: held — full" in text
    assert (
        "- **sst2 / dirichlet**: use `full` — it beats the runner-up `fedit` by +5.1 [+4.9, +5.2] pp" in text
    )


def test_the_report_pairs_only_admitted_runs_and_states_its_compute(tmp_path):
    from benchmarks.report import write_report

    dirty = _record("full", 2, [0.9, 0.95]) | {"commit": "abc+dirty"}
    text = write_report([*RECORDS, dirty], tmp_path, "t", parallel=2).read_text()
    assert "## Provenance and pairing" in text
    assert "refused, 1 run(s): made from uncommitted code (abc+dirty)" in text
    assert "95.0" not in text  # the refused run's final metric reaches no table
    assert "## The seed papers' claims (C1–C4)" in text and "## Measured compute" in text
    assert f"over {len(RECORDS) + 1} jobs" in text  # compute counts every job that ran, refused or not
