"""The LLM aggregation benchmark's synthetic nodes satisfy every rule's engine (a tiny Llama):
no reply rejected, two rounds aggregated, Fed-SB's set-up answered."""

import pytest

from benchmarks.llm_aggregation import one_rule


@pytest.mark.parametrize("name", ["fedit", "fed_sb", "flexlora", "fedex_lora"])
def test_every_synthetic_reply_is_accepted(name):
    result = one_rule(name, "tiny_llama", "all", rank=4, ranks="2,4,4,8", clients=4)
    assert [r["rejected"] for r in result["rounds"]] == [{}, {}]
    assert all(r["aggregate_seconds"] > 0 for r in result["rounds"])
    assert (result["setup_seconds"] is not None) == (name == "fed_sb")
