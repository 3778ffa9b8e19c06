"""A calibrated start for the attention-initialised mixers, and how far each one is from its attention layer.

Right after the role mapping (x = W_V, B = W_K, C = W_Q, out = W_O) every other part of a Mamba-2 mixer is
fresh, and on the default teacher that start is far worse than having no layer at all: each mixer's output is
several times the norm of the attention output it replaces and unrelated to it (issue 14: perplexity 3.6 M
against 4.4 K with those layers dropped). Three fresh parts cause it:

- the depthwise conv mixes each token's q, k and v with its three predecessors through random taps;
- the gate ``silu(z)`` of a random projection multiplies every channel by a random, mostly tiny, sign-varying
  factor before the per-head RMSNorm;
- ``D = 1`` adds the current token's value to the state read-out.

The calibrated start removes each of them and then fits the output gains in closed form:

- ``conv: identity``: the current-token tap is 1, the others 0 (x, B, C = silu of the teacher's v, k, q);
- ``gate: open``: every gate row of a head is the layer input's mean direction, scaled so that ``silu(z)`` is
  a few units on typical tokens. A gate that is one positive number per head and token cancels in the
  per-head RMSNorm, so the mixer starts as normalised linear attention with a positive feature map; the rows
  separate as soon as they train;
- ``D: 0``;
- ``gains: least squares``: with the teacher's own input to the layer (teacher-forced), the per-channel
  weights in front of ``out_proj`` (the gated norm's weight) are the ridge least-squares fit of the mixer's
  output to the attention output on a few calibration sequences of built-in text. Zero gains are one
  candidate of the fit, so on those sequences each calibrated layer is never further from its attention
  output than a dropped layer (relative error <= 1).

Whatever the start, :func:`calibrate_hybrid` measures every converted layer on the calibration sequences:
relative error ``||m - a|| / ||a||`` of the mixer output m against the attention output a, the norm ratio
``||m|| / ||a||`` and the cosine. ``convert`` writes them to ``convert_summary.json``.

The idea of fitting a converted layer to the attention output it replaces, teacher-forced, is the
"attention transfer" of LoLCATs (Zhang et al., 2024) and the hidden-state alignment of MOHAWK (Bick et al.,
2024); the closed-form per-channel fit is this project's cheap step zero of the same idea.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mamballama_cli.errors import UsageError


@dataclass(frozen=True)
class InitSpec:
    """How the parts of a converted mixer that attention does not provide start."""

    conv: str = "identity"  # identity | random (the paper's: nn.Conv1d's default)
    gate: str = "open"  # open | random (the paper's: a fresh projection)
    D: float = 0.0  # the skip; the paper's is 1
    gains: bool = True  # least-squares output gains on calibration text

    def validate(self) -> None:
        if self.conv not in ("identity", "random"):
            raise UsageError(f"init conv {self.conv!r} is not one of identity, random")
        if self.gate not in ("open", "random"):
            raise UsageError(f"init gate {self.gate!r} is not one of open, random")

    @property
    def needs_data(self) -> bool:
        return self.gate == "open" or self.gains


INITS = {
    "calibrated": InitSpec(),
    "paper": InitSpec(conv="random", gate="random", D=1.0, gains=False),
}


def init_spec(name: str) -> InitSpec:
    """A named start (``calibrated``, ``paper``) or ``key=value,...`` over the calibrated one, e.g.
    ``conv=random,gains=false``."""
    if name in INITS:
        return INITS[name]
    if "=" not in name:
        raise UsageError(f"--init {name!r} is not one of {', '.join(INITS)} nor key=value pairs "
                         "(conv=identity|random, gate=open|random, D=<float>, gains=true|false)")
    values = asdict(INITS["calibrated"])
    for part in name.split(","):
        key, _, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if key not in values:
            raise UsageError(f"--init: unknown key {key!r}; use conv, gate, D or gains")
        if key == "D":
            try:
                values[key] = float(val)
            except ValueError:
                raise UsageError(f"--init D={val!r} is not a number") from None
        elif key == "gains":
            if val.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise UsageError(f"--init gains={val!r}: use true or false")
            values[key] = val.lower() in ("true", "yes", "1")
        else:
            values[key] = val
    spec = InitSpec(**values)
    spec.validate()
    return spec


# --- calibration text --------------------------------------------------------------------------------------
def builtin_documents(heldout: bool, fraction: float = 0.05, seed: int = 0) -> list[str]:
    """CPython's pydoc topics, split as `mamballama data build` splits them: calibration never reads the
    held-out topics, and the held-out ones are what tests and reports measure on."""
    from pydoc_data.topics import topics

    from mamballama_cli.corpus import is_heldout

    return [f"Python reference: {name}\n\n{topics[name]}" for name in sorted(topics)
            if is_heldout(f"pydoc:{name}", fraction, seed) == heldout]


def token_block(tokenizer, docs: list[str], n_seqs: int, seq_len: int) -> Tensor:
    """(n_seqs, seq_len) token ids: the documents concatenated (EOS between) and cut into equal windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = n_seqs * seq_len
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    if len(ids) < need:
        n_seqs = max(1, len(ids) // seq_len)
        need = n_seqs * seq_len
        if len(ids) < need:
            raise UsageError(f"the calibration text holds {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)


def recall_probes(tokenizer, docs: list[str], n: int, length: int, seed: int = 0) -> list[tuple[Tensor, int]]:
    """``n`` associative-recall probes of ``length`` tokens, for placement by recall.

    Each probe is built token by token: a sentence stating a random five-digit code, placed at a spread of depths
    in built-in text, then a question and the code itself. Returns (ids of shape (1, length), number of code
    tokens at its end). A model recalls the code when it predicts those last tokens; how much worse it predicts
    them with one layer converted is that layer's recall score. The wording is not the eval's passkey prompt."""
    import random

    rng = random.Random(seed)
    filler: list[int] = []
    for doc in docs:
        filler += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(filler) >= 4 * length:
            break
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    probes = []
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for k in range(n):
        code = str(rng.randint(10000, 99999))
        fact = enc(f" The code is {code}. ")
        question = enc("\nThe code is")
        answer = enc(f" {code}")
        room = length - len(bos) - len(fact) - len(question) - len(answer)
        if room < 8:
            raise UsageError(f"--calibration-len {length} is too short for a recall probe; use "
                             f"{length - room + 8} or more")
        pool = filler or enc("The day was calm and nothing happened. ")
        while len(pool) < room:
            pool = pool + pool
        start = rng.randrange(len(pool) - room + 1)
        text = pool[start:start + room]
        depth = int(room * (0.1 + 0.8 * k / max(1, n - 1)))
        ids = bos + text[:depth] + fact + text[depth:] + question + answer
        probes.append((torch.tensor([ids], dtype=torch.long), len(answer)))
    return probes


@torch.no_grad()
def recall_nll(model, probes: list[tuple[Tensor, int]]) -> float:
    """Mean negative log-likelihood per code token over the probes (teacher-forced)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, k in probes:
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[0, -k - 1:-1].float()
        total += float(F.cross_entropy(logits, ids[0, -k:], reduction="sum"))
        count += k
    return total / max(count, 1)


# --- teacher-forced inputs and outputs ----------------------------------------------------------------------
@torch.no_grad()
def capture_attention(teacher, layers: list[int], input_ids: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Run the teacher once; for each listed layer return (input of its attention after the layer's norm,
    output of its attention), detached."""
    from mamballama_cli.models.hooks import capture_io

    handles, store = capture_io({i: teacher.model.layers[i].self_attn for i in layers})
    try:
        teacher(input_ids=input_ids.to(teacher.device))
    finally:
        for h in handles:
            h.remove()
    return store


def _out_proj_input(mixer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(input of out_proj, output of the mixer) for hidden input x."""
    seen = {}

    def pre(module, args):
        seen["u"] = args[0].detach()

    h = mixer.out_proj.register_forward_pre_hook(pre)
    try:
        out = mixer(x)
    finally:
        h.remove()
    return seen["u"], out.detach()


def layer_error(out: Tensor, ref: Tensor) -> dict[str, float]:
    """Relative error, norm ratio and cosine of a mixer output against the attention output."""
    o, r = out.double().flatten(), ref.double().flatten()
    rn = r.norm().clamp_min(1e-30)
    return {"rel_error": float((o - r).norm() / rn), "norm_ratio": float(o.norm() / rn),
            "cosine": float(o @ r / (o.norm().clamp_min(1e-30) * rn))}


# --- the start ---------------------------------------------------------------------------------------------
@torch.no_grad()
def apply_structure(mixer, spec: InitSpec, x: Tensor | None) -> dict:
    """Conv, gate and D of ``spec`` (x: the layer's normalised input on calibration text, for the open gate)."""
    info: dict = {}
    if spec.conv == "identity":
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0  # causal conv: the last tap reads the current token
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.zero_()
    if hasattr(mixer, "D"):
        mixer.D.fill_(spec.D)
    rows = mixer.in_proj_slices()["z"]
    if spec.gate == "open" and rows.stop > rows.start:  # a mixer without a gate (convert --no-gate) has no z rows
        if x is None:
            raise UsageError("the open gate needs calibration text (the layer input's mean direction)")
        flat = x.reshape(-1, x.shape[-1]).float()
        mean = flat.mean(0)
        direction = mean / mean.norm().clamp_min(1e-12)
        proj = flat @ direction  # what every gate row reads, per token
        scale = 4.0 / proj.median().abs().clamp_min(1e-6)  # silu(z) about 4 on the median token
        w = mixer.in_proj.weight
        w[rows] = (scale * direction).to(w.dtype).expand(rows.stop - rows.start, -1)
        if mixer.in_proj.bias is not None:
            mixer.in_proj.bias[rows] = 0.0
        info["gate_positive_fraction"] = float((proj > 0).float().mean())
    return info


@torch.no_grad()
def fit_gains(mixer, u: Tensor, a: Tensor, ridge: float = 1e-4) -> Tensor:
    """Per-channel gains g minimising ||out_proj(g * u) - a||^2 + ridge * trace-scaled ||g||^2.

    u: (..., d) what out_proj reads; a: (..., H) the attention output. With W = out_proj.weight (H, d) the
    normal equations are ((U^T U) * (W^T W)) g = sum_t u_t * (W^T (a_t - bias)). Returns g (d,).
    """
    W = mixer.out_proj.weight.double()
    U = u.reshape(-1, u.shape[-1]).double()
    A = a.reshape(-1, a.shape[-1]).double()
    if mixer.out_proj.bias is not None:
        A = A - mixer.out_proj.bias.double()
    G = (U.T @ U) * (W.T @ W)
    b = (U * (A @ W)).sum(0)
    lam = ridge * G.diagonal().mean().clamp_min(1e-30)
    G.diagonal().add_(lam)
    return torch.linalg.solve(G, b)


@torch.no_grad()
def apply_gains(mixer, g: Tensor) -> None:
    """Fold per-channel gains into the gated norm's weight (Mamba-2) or out_proj's columns (no norm)."""
    norm = getattr(mixer, "norm", None)
    if getattr(mixer, "gated_norm", False) and norm is not None:
        norm.weight.mul_(g.to(norm.weight.dtype))
    else:
        mixer.out_proj.weight.mul_(g.to(mixer.out_proj.weight.dtype)[None, :])


@torch.no_grad()
def calibrate_hybrid(student, teacher, input_ids: Tensor, spec: InitSpec, progress=None) -> list[dict]:
    """Apply ``spec`` to every Mamba layer of ``student`` and measure each against its attention layer.

    Both models run on ``input_ids`` (n, L); the student's mixers are called on the teacher's own input to
    each layer (teacher-forced). Returns one record per converted layer: the error of the mapped start
    (before), of the structural start, and after the gain fit (final).
    """
    layers = [i for i, layer in enumerate(student.model.layers) if not layer.is_attention]
    if not layers:
        return []
    spec.validate()
    store = capture_attention(teacher, layers, input_ids)
    device = next(student.parameters()).device
    records = []
    for i in layers:
        mixer = student.model.layers[i].mamba
        x, a = store.pop(i)
        x = x.to(device=device, dtype=next(mixer.parameters()).dtype)
        a = a.to(device).float()
        _, out = _out_proj_input(mixer, x)
        rec = {"layer": i, "mapped": layer_error(out.float(), a)}
        if hasattr(mixer, "in_proj_slices"):
            rec.update(apply_structure(mixer, spec, x))
        u, out = _out_proj_input(mixer, x)
        rec["structured"] = layer_error(out.float(), a)
        if spec.gains:
            g = fit_gains(mixer, u.float(), a)
            apply_gains(mixer, g)
            _, out = _out_proj_input(mixer, x)
            rec["gain_rms"] = float(g.pow(2).mean().sqrt())
        rec["final"] = layer_error(out.float(), a)
        records.append(rec)
        if progress is not None:
            progress(i)
    return records


# --- whole-model numbers -----------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, input_ids: Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over every position but the first of each row."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, input_ids.shape[0], batch):
        ids = input_ids[s:s + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


@contextlib.contextmanager
def dropped_mixers(student):
    """Every Mamba mixer of ``student`` outputs zeros while inside (the teacher without those attention layers:
    the baseline a converted start must beat)."""
    mixers = [layer.mamba for layer in student.model.layers if not layer.is_attention]
    handles = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for m in mixers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
