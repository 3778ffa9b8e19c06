"""benchmarks/op_count.py: one walk over the layers, whatever the number of new tokens (issue 15's runtime)."""

import sys
from pathlib import Path

import pytest
from helpers import tiny_hybrid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_count import count_walks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_verify_call_runs_the_ops_of_a_one_token_walk_and_no_glue_kernels():
    from mamballama_cli.models.step import OpTable

    before = OpTable.__missing__
    model = tiny_hybrid(attn_layers=(1, 3))[0]
    res = count_walks(model, 12, 4, vocab=50)
    assert OpTable.__missing__ is before  # the counting is undone
    walk, verify, plain = res["walk1"], res["verify"], res["plain"]
    assert verify["ops"] == walk["ops"] and verify["glue"] == walk["glue"]  # the same walk at 1 and 5 tokens
    n_attn = len(model.config.attn_layers)
    n_mamba = model.config.num_hidden_layers - n_attn
    assert verify["ops"]["add_rmsnorm_gemv_swiglu"] == n_attn + n_mamba  # one fused MLP entry per layer
    assert verify["ops"]["ssm_replay_gated"] == verify["ops"]["add_rmsnorm_gemv_spec_conv"] == n_mamba
    assert verify["ops"]["window_attention"] == verify["ops"]["rope_kv_write_window"] == n_attn
    assert sum(verify["glue"].values()) <= 2  # the embedding and the replay slot's flip: no copies between ops
    assert plain["ops"]["ssm_step_gated"] == n_mamba and plain["ops"]["decode_attention"] == n_attn
