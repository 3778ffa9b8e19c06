"""A short distillation with the training kernels (fused KD loss, causal conv) follows the reference exactly.

The Triton kernels of ops/kd_triton.py and ops/triton_conv.py run on CPU tensors under Triton's interpreter (in
a subprocess: TRITON_INTERPRET must be set before triton is imported); the same steps run again on the
references. Same initialisation, data and optimizer: the loss and gradient-norm curves must agree to float32
rounding. This is the whole-training-loop check behind the per-op tests (tests/test_kd_fused.py,
tests/test_conv_triton.py, and the gpu-marked ones). Skipped when triton is not installed.
"""

from helpers import NEEDS_TRITON, interpreted_json

pytestmark = NEEDS_TRITON

SCRIPT = r"""
import json, sys, torch
import mamballama_cli  # noqa: F401
from mamballama_cli import ops
from transformers import LlamaConfig, LlamaForCausalLM
from mamballama_cli.convert.converter import convert_model
from mamballama_cli.training.losses import kd_loss_auto

if sys.argv[1] == "fast":  # the CUDA choice of kernels, forced on CPU tensors (the interpreter runs them)
    from mamballama_cli.ops.kd_triton import kd_loss_fused
    from mamballama_cli.ops.triton_conv import causal_conv1d_triton
    chosen = {"kd_loss": kd_loss_fused, "causal_conv1d": causal_conv1d_triton}
    reference_dispatch = ops.dispatch
    ops.dispatch = lambda op, device: ("triton", chosen[op]) if op in chosen else reference_dispatch(op, device)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
teacher = LlamaForCausalLM(cfg).eval()
student, _ = convert_model(teacher, [1, 3], dtype=torch.float32, seed=0)
student.train()
opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
data = torch.randint(0, 300, (24, 40), generator=torch.Generator().manual_seed(1))
curve = []
for step in range(6):
    ids = data[4 * step: 4 * step + 4]
    with torch.no_grad():
        t = teacher(ids).logits
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, :5] = False  # a "prompt" the loss must not see
    mask[:, -1] = False
    total, m = kd_loss_auto(student(ids).logits, t, torch.roll(ids, -1, 1), mask, w_kl=1.0, w_rkl=0.3, w_ce=0.2)
    (total / mask.sum()).backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    curve.append([float(m["kl"]), float(m["rkl"]), float(m["ce"]), float(norm)])
print(json.dumps(curve))
"""


def run(mode: str) -> list:
    return interpreted_json(SCRIPT, mode)


def test_training_with_triton_kernels_follows_the_reference_curve():
    ref, fast = run("ref"), run("fast")
    assert len(ref) == len(fast) == 6
    for r, f in zip(ref, fast):
        for a, b in zip(r, f):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (ref, fast)
    assert ref[-1][0] != ref[0][0]  # the curve moves: the comparison is not between two idle runs
