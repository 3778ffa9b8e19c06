"""How many ops does one inference walk run? The op-table calls (each one kernel, or a few, on CUDA) and the glue
aten ops outside them (views left out), for a plain decode step, a 1-token window walk and a verify call of K + 1
tokens, on a random model of a named shape. It runs on the CPU: the counts depend on the code path, not the device.

    python benchmarks/op_count.py --shape smollm2-135m --ratio 0.5 -k 6

On 2026-12-06 at the default teacher's 50% shape it printed 166 op calls and 7 glue ops for the plain step, and 181
op calls and 2 glue ops (the embedding and one flip of the replay slot) for the 1-token walk and for the 7-token
verify call alike. So what a verify call adds at that size is the cost of each kernel at 7 rows
(docs/benchmarks.md, twenty-first session), not more kernels.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no kernel (views, allocations, metadata)
NO_KERNEL = {"view", "_unsafe_view", "slice", "select", "split", "split_with_sizes", "as_strided", "expand", "t",
             "transpose", "permute", "unsqueeze", "squeeze", "alias", "detach", "unbind", "narrow", "_reshape_alias",
             "reshape", "view_as", "lift_fresh", "empty", "empty_like", "scalar_tensor", "unflatten", "detach_",
             "to"}  # ``to``: a cast that copies shows up as ``_to_copy``


class Counter(TorchDispatchMode):
    """Counts op-table calls (``ops``) and the aten ops outside them (``glue``)."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.ops: collections.Counter = collections.Counter()
        self.glue: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.inside and name not in NO_KERNEL:
            self.glue[name] += 1
        return func(*args, **(kwargs or {}))

    def missing(self, original):
        """An ``OpTable.__missing__`` that resolves as ``original`` and makes the op count its calls."""
        counter = self

        def missing(tab, op):
            fn = original(tab, op)

            def counted(*a, **k):
                counter.ops[op] += 1
                counter.inside += 1
                try:
                    return fn(*a, **k)
                finally:
                    counter.inside -= 1
            tab[op] = counted
            return counted
        return missing


def count(counter: Counter, name: str, fn) -> dict:
    fn()  # resolves the ops
    counter.ops.clear()
    counter.glue.clear()
    with torch.no_grad(), counter:
        fn()
    res = {"op_calls": sum(counter.ops.values()), "glue_ops": sum(counter.glue.values()),
           "ops": dict(counter.ops.most_common()), "glue": dict(counter.glue.most_common())}
    print(f"{name}: {res['op_calls']} op calls, {res['glue_ops']} glue aten ops\n  ops {res['ops']}\n"
          f"  glue {res['glue']}")
    return res


def count_walks(model, prompt_len: int, k: int, vocab: int = 1000) -> dict:
    """The counts of a plain step, a 1-token window walk and a verify call of ``k + 1`` tokens of ``model`` (CPU)."""
    from mamballama_cli.models.step import OpTable

    ids = torch.randint(3, vocab, (1, prompt_len))
    counter = Counter()
    capacity = prompt_len + 4 * (k + 1)
    out = {}
    original = OpTable.__missing__
    OpTable.__missing__ = counter.missing(original)  # the runtimes built below count every op they resolve
    try:
        _walks(model, ids, prompt_len, k, capacity, counter, out)
    finally:
        OpTable.__missing__ = original
    return out


def _walks(model, ids, prompt_len: int, k: int, capacity: int, counter: Counter, out: dict) -> None:
    from mamballama_cli.generation.fast import StaticDecoder
    from mamballama_cli.generation.speculative import HybridRunner

    with torch.no_grad():
        dec = StaticDecoder(model, 1, capacity, capture=False)
        dec.prefill(ids)
        out["plain"] = count(counter, "plain step", dec._step)
        runner = HybridRunner(model, 1, capacity, window=k + 1)
        runner.prefill(ids)

        def walk(T: int):
            x = torch.zeros(1, T, dtype=torch.long)

            def run():
                runner.start, runner.wlen, runner.keep = [prompt_len], 0, [T]
                runner.extend(x, rebase=True)
            return run
        out["walk1"] = count(counter, "window walk, 1 token", walk(1))
        out["verify"] = count(counter, f"verify call, {k + 1} tokens", walk(k + 1))


def main() -> None:
    from mamballama_cli.convert.placement import attention_layers_for_ratio
    from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("-k", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    tc = teacher_config(args.shape)
    hc = hybrid_config(tc, attention_layers_for_ratio(tc.num_hidden_layers, args.ratio))
    model = random_model(MamballamaForCausalLM, hc, torch.float32, torch.device("cpu"))
    count_walks(model, args.prompt, args.k, min(1000, tc.vocab_size))


if __name__ == "__main__":
    main()
