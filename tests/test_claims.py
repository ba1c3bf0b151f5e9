"""Which runs the report pairs (uncommitted or mixed training code refused unless a fingerprint
reproduced bit for bit) and the C1–C4 verdicts from paired intervals."""

import pytest

from benchmarks.claims import CLAIMS, claims_section, decide, judge, rounds_to_target
from benchmarks.pairing import admit
from benchmarks.stats import Interval


def run(method, seed, final, commit="c1", setting="dir05", dataset="sst2", metrics=None, model="minilm"):
    metrics = metrics or [0.5, final]
    return {
        "job": f"{method}-{dataset}-{setting}-s{seed}", "method": method, "dataset": dataset, "model": model,
        "setting": setting, "partition": "dirichlet", "seed": seed, "commit": commit,
        "rounds": [
            {"round": 2 * i, "metric": m, "eval_loss": 1 - m, "train_loss": 0.3, "bytes_down": 9, "bytes_up": 5}  # noqa: E501
            for i, m in enumerate(metrics)
        ],
    }  # fmt: skip


def test_runs_from_uncommitted_code_are_refused():
    admitted = admit(
        [run("fedit", 0, 0.8), run("full", 0, 0.9, commit="c1+dirty"), run("galore", 0, 0.8, "")], []
    )
    assert [r["method"] for r in admitted.kept] == ["fedit"]
    assert "uncommitted" in admitted.refused["full-sst2-dir05-s0"]
    assert "unknown code" in admitted.refused["galore-sst2-dir05-s0"]


def test_runs_from_mixed_training_code_pair_only_after_a_bit_identical_fingerprint():
    records = [
        run("fedit", 0, 0.80),
        run("full", 0, 0.85),
        run("fedit", 1, 0.81, "c2"),
        run("full", 1, 0.86, "c2"),
    ]
    refused = admit(records, [])
    assert {r["commit"] for r in refused.kept} == {"c1"}  # fedit at seed 0 ran at c1: the reference
    assert "no run shows `c2` trains like `c1`" in refused.refused["full-sst2-dir05-s1"]
    off = run("fedit", 0, 0.80, "c2", metrics=[0.5, 0.8000001])  # one metric differs in the last digits
    assert len(admit(records, [off]).kept) == 2
    assert "mixed training code" in admit(records, [off]).refused["fedit-sst2-dir05-s1"]
    same = run("fedit", 0, 0.80, "c2")
    admitted = admit(records, [same])
    assert len(admitted.kept) == 4 and "bit for bit" in admitted.notes[0]


def test_equivalence_is_any_job_reproduced_across_commits_and_the_larger_class_is_kept():
    # c1 holds no fedit seed 0 (a sub-grid ran first); c2 later records it: c2's re-run of c1's
    # full-s0 shows they train alike, so nothing is lost when the reference job moves
    records = [run("full", 0, 0.85), run("ffa_lora", 0, 0.78)]
    records += [run("fedit", 0, 0.80, "c2"), run("full", 1, 0.86, "c2"), run("fedit", 1, 0.81, "c2")]
    assert {r["commit"] for r in admit(records, []).kept} == {"c2"}  # the larger class, alone
    admitted = admit(records, [run("full", 0, 0.85, "c2")])
    assert len(admitted.kept) == 5 and not admitted.refused


def test_beats_needs_the_interval_above_zero_and_matches_tolerates_the_margin():
    assert decide(Interval(0.02, 0.01, 0.03, 5), "beats") == "held"
    assert decide(Interval(0.01, -0.01, 0.03, 5), "beats") == "not resolved"
    assert decide(Interval(-0.02, -0.03, -0.01, 5), "beats") == "did not hold"
    assert decide(Interval(0.0, -0.005, 0.005, 5), "matches") == "held"
    assert decide(Interval(-0.01, -0.03, 0.01, 5), "matches") == "not resolved"
    assert decide(Interval(-0.02, -0.03, -0.001, 5), "matches") == "did not hold"


def test_rounds_to_target_is_the_first_scored_round_reaching_it_and_censored_past_the_end():
    record = run("hlora", 0, 0.8, metrics=[0.5, 0.6, 0.75, 0.8])  # rounds 0, 2, 4, 6
    assert rounds_to_target(record, 0.7) == 4
    assert rounds_to_target(record, 0.9) == 8  # never: one scoring interval past the last round


def test_c1_holds_when_full_beats_every_compared_lora_rule_on_every_seed_in_both_cells():
    records = []
    for seed in range(5):
        for dataset, setting in (("sst2", "dir05"), ("cifar10", "vision_dir05")):
            noise = 0.002 * seed
            records += [
                run("full", seed, 0.85 + noise, dataset=dataset, setting=setting),
                run("galore", seed, 0.84 + noise, dataset=dataset, setting=setting),
                run("fedit", seed, 0.80 + noise * 1.5, dataset=dataset, setting=setting),
                run("ffa_lora", seed, 0.78 + noise, dataset=dataset, setting=setting),
                run("flexlora", seed, 0.79 + noise / 2, dataset=dataset, setting=setting),
            ]
    lines = claims_section(records)
    c1 = next(line for line in lines if line.startswith("- **C1"))
    assert c1.endswith("**held**.")
    # galore now loses to flexlora on images, every seed: the claim did not hold in part
    for r in records:
        if r["method"] == "galore" and r["dataset"] == "cifar10":
            r["rounds"][-1]["metric"] = 0.70
    c1 = next(line for line in claims_section(records) if line.startswith("- **C1"))
    assert c1.endswith("**did not hold in part**.")


def test_c3_faster_compares_paired_rounds_to_the_lower_final_metric():
    claim = next(c for c in CLAIMS if c.key == "C3")
    faster = next(c for c in claim.comparisons if c.kind == "faster" and c.b == "hetlora")
    records = []
    for seed in range(3):
        records.append(run("hlora", seed, 0.80, metrics=[0.5, 0.78, 0.80, 0.80]))
        records.append(
            run("hetlora", seed, 0.79 + seed * 0.001, metrics=[0.5, 0.6, 0.7, 0.79 + seed * 0.001])
        )
    from benchmarks.claims import by_cell

    outcome = judge(faster, ("sst2", "dir05"), by_cell(records))
    # the target is hetlora's mean final 0.791: hlora reaches it at round 4; hetlora never (8), then at 6, 6
    assert outcome.interval is not None and outcome.interval.mean == pytest.approx((4 + 2 + 2) / 3)
    assert outcome.verdict == "not resolved"  # differences 4, 2, 2 over three seeds: t interval spans 0


def test_both_sides_at_chance_give_no_verdict():
    chance = {"eval_examples": 872, "majority_rate": 0.51}
    records = [run(m, s, 0.51) | {"chance": chance} for m in ("ffa_lora", "fedit") for s in range(3)]
    records[0]["rounds"][-1]["metric"] = 0.512
    line = next(line for line in claims_section(records) if "`ffa_lora` matches `fedit` — sst2/dir05" in line)
    assert "both at chance" in line and line.endswith("no verdict")


def test_commits_whose_job_code_git_shows_identical_pair_without_a_fingerprint():
    records = [run("fedit", 0, 0.80), run("full", 0, 0.85), run("full", 1, 0.86, "c2")]
    admitted = admit(records, [], same_code=lambda a, b: {a, b} == {"c1", "c2"})
    assert len(admitted.kept) == 3 and "no change to the job code" in admitted.notes[0]


def test_same_run_code_reads_git():
    from benchmarks.results import same_run_code
    from launch.simulation import PROJECT_DIR

    assert same_run_code(PROJECT_DIR, "HEAD", "HEAD")
    assert not same_run_code(PROJECT_DIR, "HEAD", "no-such-commit")


def test_a_claim_with_cells_not_run_is_not_held():
    records = [run(m, s, f + 0.001 * s) for s in range(5) for m, f in (("full", 0.85), ("fedit", 0.80))]
    records += [
        run(m, s, f + 0.001 * s) for s in range(5) for m, f in (("ffa_lora", 0.78), ("flexlora", 0.79))
    ]
    records += [run("galore", s, 0.84 + 0.001 * s) for s in range(5)]
    c1 = next(line for line in claims_section(records) if line.startswith("- **C1"))
    assert c1.endswith("**not resolved (5 of 10 comparisons decided)**.")  # the image cell never ran
    assert any("cifar10/vision_dir05: not run" in line for line in claims_section(records))


def test_a_cell_the_preset_cut_says_why_in_place_of_a_verdict():
    from benchmarks.report import preset_cuts

    cuts = preset_cuts("cpu-paired")
    assert "chance" in cuts["sst2/dp8"]  # the measured reason, from conf/sweep/cpu_paired.yaml
    records = [run(m, s, 0.8) for m in ("ffa_lora", "fedit") for s in range(3)]
    lines = claims_section(records, cuts=cuts)
    line = next(line for line in lines if "`ffa_lora` matches `fedit` — sst2/dp8" in line)
    assert "sst2/dp8: cut from this preset" in line and line.endswith("no verdict")
    assert any(line.startswith("- `sst2/dp8`: DP-SGD does not learn") for line in lines)  # the reason, once
    assert any("sst2/dp3: not run" in line for line in claims_section(records))  # without the key


def test_the_job_code_git_compares_is_every_package_a_job_runs():
    import tomllib

    from benchmarks.results import RUN_CODE_PATHS
    from launch.simulation import PROJECT_DIR

    build = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    packages = set(build["targets"]["wheel"]["packages"]) - {"benchmarks"}  # the report, not a job
    assert packages <= set(RUN_CODE_PATHS) and {"conf", "pyproject.toml"} <= set(RUN_CODE_PATHS)
