"""Mamba token mixers that replace attention, initialised from that layer's attention weights.

Mamba-2 mixer (design.md section 2), per token:
    [z, x, B, C, dt_raw] = in_proj(h)          z, C: n_h*P / n_h*N;  x, B: n_kv*P / n_kv*N;  dt_raw: n_h
    [x, B, C] = silu(causal_conv1d([x, B, C]))
    dt = softplus(dt_raw + dt_bias);  A = -exp(A_log)
    SSM head i reads x and B of group i // (n_h / n_kv) and its own C (GQA kept, not duplicated)
    y = SSD(x, dt, A, B, C) + D * x
    out = out_proj(rmsnorm(y * silu(z)))       norm groups of P channels, one per head
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamballama_cli import ops
from mamballama_cli.models.step import (
    NormedInput,
    ReplayWindow,
    Step,
    one_token_step,
    project_in_conv,
    project_in_window_conv,
)


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class AttentionInitMixer(nn.Module):
    """What the converter needs from a mixer initialised from attention (Mamba-2 and Mamba-1 share it).

    A subclass has ``in_proj`` (rows named by :meth:`in_proj_sizes`: z, x, B, C, dt), ``out_proj``, ``conv1d``
    and lists the parameters the attention weights do not provide in ``FRESH_PARAMS``. The converter's table
    names *roles* (x = W_V, B = W_K, C = W_Q, out = W_O); the mixer owns where each role lands.
    """

    FRESH_PARAMS: tuple[str, ...] = ()

    WINDOW: type  # the subclass's replay window (a models.step.ReplayWindow), set below each window class

    def __init__(self, config, layer_idx: int):
        """The fields both mixers read from the config the same way (``mamba_*``)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.n_heads = config.mamba_n_heads
        self.headdim = config.mamba_headdim
        self.d_conv = config.mamba_d_conv
        self.chunk_size = config.mamba_chunk_size
        self.activation = None if config.mamba_activation in (None, "identity") else config.mamba_activation
        self.dt_min, self.dt_max = config.mamba_dt_min, config.mamba_dt_max
        self.dt_init_floor = config.mamba_dt_init_floor

    def depthwise_conv(self, channels: int, bias: bool) -> nn.Conv1d:
        """The causal depthwise conv over ``channels`` (left padding d_conv - 1, cut back in forward)."""
        return nn.Conv1d(
            channels, channels, kernel_size=self.d_conv, groups=channels, padding=self.d_conv - 1, bias=bias
        )

    def sample_dt(self, n: int) -> Tensor:
        """``n`` step sizes, log-uniform in [dt_min, dt_max], floored at dt_init_floor (one RNG draw)."""
        return torch.exp(
            torch.rand(n) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)

    def init_ssm_parameters(self, init_mod=None) -> None:
        raise NotImplementedError

    # --- forward (parallel: training, prefill) -----------------------------------------------------------
    def forward(self, hidden: Tensor, state: dict | None = None, attention_mask: Tensor | None = None,
                continuing: bool = False) -> Tensor:
        """hidden (batch, seqlen, hidden). ``state`` (from the cache) is read when ``continuing`` and
        always updated in place; attention_mask (batch, seqlen), given only when some position is padding,
        zeros padded positions so that they neither write to the state nor disturb the conv window."""
        if attention_mask is not None:
            hidden = torch.where(attention_mask[..., None].bool(), hidden, torch.zeros_like(hidden))
        if state is not None and continuing and hidden.shape[1] == 1:  # one cached token: the decode step
            return self.step(hidden[:, 0], state, one_token_step(hidden.device))[:, None]
        return self._scan_into(hidden, state, continuing, attention_mask)

    def _scan_into(self, hidden: Tensor, state: dict | None, continuing: bool, mask: Tensor | None) -> Tensor:
        """The parallel scan from ``state`` (when ``continuing``; else from zeros), the state then updated in place."""
        carried = state if (state is not None and continuing) else None
        y, z, new_conv, final_state = self.scan(hidden, carried, mask)
        if state is not None:
            state["conv"].copy_(new_conv)
            state["ssm"].copy_(final_state)
        return self.output(y, z)

    def scan(self, hidden: Tensor, carried: dict | None, mask: Tensor | None):
        """The parallel scan over ``hidden`` from the ``carried`` {"conv", "ssm"} state (None: from zeros):
        (y before the gate, z, the new conv window, the final SSM state)."""
        raise NotImplementedError

    def gate(self, y: Tensor, z: Tensor) -> Tensor:
        raise NotImplementedError

    def output(self, y: Tensor, z: Tensor, linear=None, normed: bool = False) -> Tensor:
        """y -> the mixer's gate (:meth:`gate`; not when ``normed``: applied already) -> out_proj (through
        ``linear(x, weight, bias)`` when given: a window step's ``gemv`` op)."""
        if not normed:
            y = self.gate(y, z)
        if not torch.is_autocast_enabled(y.device.type):  # under autocast the projection casts (to bf16) itself
            y = y.to(self.out_proj.weight.dtype)
        if linear is not None:
            return linear(y, self.out_proj.weight, self.out_proj.bias)
        return self.out_proj(y)

    # --- inference (models/step.py) ----------------------------------------------------------------------
    def inference_state(self, cache, window: int = 0, keep_live: bool = False):
        """Decode: the cache's own {"conv", "ssm"} of this layer. Window: the mixer's :attr:`WINDOW`."""
        if not window:
            return cache.mamba_state(self.layer_idx)
        return self.WINDOW(self, cache.batch_size, window, cache.dtype, cache.device, keep_live)

    def step(self, x: Tensor, state, step: Step) -> Tensor:
        """The new tokens' output (models/step.py): one token in place, a window with replay, or a prompt piece (the
        parallel scan from the decode state, which it updates in place; the norm apart, then ``forward``'s path)."""
        if step.piece:
            h = x
            if isinstance(x, NormedInput):
                h, x.new_residual = step.fns["add_rmsnorm"](x.hidden, x.residual, x.weight, x.eps)
            return self._scan_into(h, state, True, None)
        return self._step_window(x, state, step) if step.window else self._step_one(x, state, step)

    @staticmethod
    @torch.no_grad()
    def write_initial(values: dict, init_mod=None) -> None:
        """Write ``{parameter: value}``: through transformers' guarded ``initialization`` module when given (it
        skips parameters already loaded from a checkpoint), else in place."""
        for param, value in values.items():
            if init_mod is not None:
                init_mod.copy_(param, value.to(param.dtype))
            else:
                param.copy_(value)

    @torch.no_grad()
    def reset_fresh_parameters(self) -> None:
        """Fresh init of everything the attention weights do not provide (design.md section 2; docs/mamba1.md):
        the z and dt rows of in_proj as nn.Linear's default, the conv, and the SSM parameters."""
        w = self.in_proj.weight
        s = self.in_proj_slices()
        for part in ("z", "dt"):
            if s[part].stop == s[part].start:  # no gate (``mamba_gate=False``): no z rows
                continue
            fresh = torch.empty_like(w[s[part]])
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # nn.Linear's default
            w[s[part]] = fresh
        if self.in_proj.bias is not None:
            self.in_proj.bias.zero_()
        self.conv1d.reset_parameters()
        self.init_ssm_parameters()

    def in_proj_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def in_proj_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in self.in_proj_sizes().items():
            out[name] = slice(start, start + size)
            start += size
        return out

    def role_targets(self) -> dict[str, tuple[str, slice | None]]:
        """Where each attention weight lands."""
        s = self.in_proj_slices()
        targets = {
            "x": ("in_proj.weight", s["x"]),  # W_V
            "B": ("in_proj.weight", s["B"]),  # W_K
            "C": ("in_proj.weight", s["C"]),  # W_Q
            "out": ("out_proj.weight", None),  # W_O
        }
        if self.in_proj.bias is not None:
            targets.update(x_bias=("in_proj.bias", s["x"]), B_bias=("in_proj.bias", s["B"]),
                           C_bias=("in_proj.bias", s["C"]))
        if self.out_proj.bias is not None:
            targets["out_bias"] = ("out_proj.bias", None)
        return targets

    def fresh_targets(self) -> list[tuple[str, slice | None]]:
        """Parameters (or row ranges) the attention weights do not provide; initialised fresh."""
        s = self.in_proj_slices()
        parts = [s[k] for k in ("z", "dt") if s[k].stop > s[k].start]
        fresh = [("in_proj.weight", rows) for rows in parts] + [(n, None) for n in self.FRESH_PARAMS]
        if self.conv1d.bias is not None:
            fresh.append(("conv1d.bias", None))
        if self.in_proj.bias is not None:
            fresh += [("in_proj.bias", rows) for rows in parts]
        return fresh

    @torch.no_grad()
    def assign_role(self, role: str, tensor: Tensor) -> None:
        name, rows = self.role_targets()[role]
        param = self.get_parameter(name)
        target = param if rows is None else param[rows]
        if target.shape != tensor.shape:
            raise ValueError(f"role {role!r} -> {name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.copy_(tensor.to(param.dtype))


class Mamba2Mixer(AttentionInitMixer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.n_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.gated_norm = config.mamba_gated_norm
        self.eps = config.rms_norm_eps
        self.A_init_range = tuple(config.mamba_A_init_range)

        self.d_inner = self.n_heads * self.headdim  # the SSM output, what the norm and out_proj read
        self.d_z = self.d_inner if config.mamba_gate else 0  # the gate's rows of in_proj (none without a gate)
        self.d_x = self.n_groups * self.headdim
        self.d_B = self.n_groups * self.d_state
        self.d_C = self.n_heads * self.d_state
        self.conv_dim = self.d_x + self.d_B + self.d_C
        d_in_proj = self.d_z + self.conv_dim + self.n_heads
        self.in_proj = nn.Linear(self.hidden_size, d_in_proj, bias=config.mamba_proj_bias)
        self.conv1d = self.depthwise_conv(self.conv_dim, config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, eps=self.eps, group_size=self.headdim)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        self.init_ssm_parameters()

    # --- layout ------------------------------------------------------------------------------------------
    FRESH_PARAMS = ("conv1d.weight", "dt_bias", "A_log", "D", "norm.weight")

    def in_proj_sizes(self) -> dict[str, int]:
        """Rows of in_proj.weight: z, x, B, C, dt (in that order)."""
        return {"z": self.d_z, "x": self.d_x, "B": self.d_B, "C": self.d_C, "dt": self.n_heads}

    def conv_slices(self) -> dict[str, slice]:
        return {
            "x": slice(0, self.d_x),
            "B": slice(self.d_x, self.d_x + self.d_B),
            "C": slice(self.d_x + self.d_B, self.conv_dim),
        }

    # --- initialisation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_ssm_parameters(self, init_mod=None) -> None:
        """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]; A_log = log U[A_init_range]; D = 1.

        ``init_mod`` is transformers' guarded ``initialization`` module when called from ``_init_weights``
        (it skips parameters already loaded from a checkpoint); plain copies otherwise.
        """
        if self.dt_bias.device.type == "meta":
            return
        dt = self.sample_dt(self.n_heads)
        lo, hi = self.A_init_range
        values = {
            self.dt_bias: inverse_softplus(dt),
            self.A_log: torch.log(torch.empty(self.n_heads).uniform_(lo, hi)),
            self.D: torch.ones(self.n_heads),
            self.norm.weight: torch.ones(self.d_inner),
        }
        self.write_initial(values, init_mod)

    # --- state -------------------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, dtype: torch.dtype, device) -> dict[str, Tensor]:
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, dtype=dtype, device=device),
            "ssm": torch.zeros(
                batch_size, self.n_heads, self.headdim, self.d_state, dtype=torch.float32, device=device
            ),
        }

    # --- forward -----------------------------------------------------------------------------------------
    def split_in(self, zxbcdt: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """in_proj's output (..., d_in_proj) -> z (None without a gate), [x | B | C], dt_raw: views."""
        z, xbc, dt_raw = torch.split(zxbcdt, [self.d_z, self.conv_dim, self.n_heads], dim=-1)
        return (z if self.d_z else None), xbc, dt_raw

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(xbc, [self.d_x, self.d_B, self.d_C], dim=-1)

    def _expand_heads(self, x: Tensor) -> Tensor:
        """(..., n_groups, P) -> (..., n_heads, P): head i reads group i // (n_heads / n_groups)."""
        r = self.n_heads // self.n_groups
        return x if r == 1 else x.repeat_interleave(r, dim=-2)

    def ssm_inputs(self, zxbcdt: Tensor, conv_state: Tensor | None, mask: Tensor | None):
        """Shared by prefill and speculative verification: conv, split and discretisation inputs.

        zxbcdt: (batch, seqlen, d_in_proj). Returns z, x, B, C, dt_raw, new_conv_state with
        x (b, l, n_groups, P), B (b, l, n_groups, N), C (b, l, n_heads, N), dt_raw (b, l, n_heads).
        """
        b, seqlen, _ = zxbcdt.shape
        z, xbc, dt_raw = self.split_in(zxbcdt)
        weight = self.conv1d.weight[:, 0, :]  # (conv_dim, width)
        xbc, new_conv = ops.causal_conv1d(
            xbc.transpose(1, 2), weight, self.conv1d.bias, initial_state=conv_state, activation=self.activation
        )
        xbc = xbc.transpose(1, 2)  # (b, l, conv_dim)
        if mask is not None:
            xbc = torch.where(mask[..., None].bool(), xbc, torch.zeros_like(xbc))
        x, B, C = self._split_xbc(xbc)
        x = x.reshape(b, seqlen, self.n_groups, self.headdim)
        B = B.reshape(b, seqlen, self.n_groups, self.d_state)
        C = C.reshape(b, seqlen, self.n_heads, self.d_state)
        return z, x, B, C, dt_raw, new_conv

    def project_in(self, hidden: Tensor) -> Tensor:
        """in_proj(hidden), through a weight padded to a multiple of 8 rows on CUDA for many tokens.

        d_in_proj = 2 n_h P + 2 n_kv N + n_h is odd for most teachers (SmolLM2: 1545): the GEMM's output rows
        are then not 16-byte aligned and cuBLAS falls back to slow kernels (about 7x slower on an H200, the
        largest single cost of a SmolLM2 distillation step). Padding the weight with zero rows gives an
        aligned output, of which the first d_in_proj columns are returned (a view); gradients flow to the
        real rows only. Values are those of in_proj itself; parameters and checkpoints are unchanged.
        """
        w, b = self.in_proj.weight, self.in_proj.bias
        pad = (-w.shape[0]) % 8
        if not pad or not hidden.is_cuda or hidden.shape[:-1].numel() < 64:
            return self.in_proj(hidden)
        w = F.pad(w, (0, 0, 0, pad))
        b = F.pad(b, (0, pad)) if b is not None else None
        return F.linear(hidden, w, b)[..., : self.in_proj.out_features]

    def gate(self, y: Tensor, z: Tensor) -> Tensor:
        """y (b, l, n_heads * P) -> the gated norm (none with ``mamba_gated_norm=False``)."""
        if self.gated_norm:
            y = ops.rmsnorm_gated(y, z, self.norm.weight, self.eps, self.headdim)
        return y

    def scan(self, hidden: Tensor, carried: dict | None, mask: Tensor | None):
        b, seqlen, _ = hidden.shape
        zxbcdt = self.project_in(hidden)
        A = -torch.exp(self.A_log.float())
        conv_state = carried["conv"] if carried is not None else None
        ssm_state = carried["ssm"] if carried is not None else None
        z, x, B, C, dt_raw, new_conv = self.ssm_inputs(zxbcdt, conv_state, mask)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        y, final_state = ops.ssd_scan(
            self._expand_heads(x), dt, A, B, C, chunk_size=self.chunk_size, D=self.D, initial_state=ssm_state
        )
        return y.reshape(b, seqlen, self.d_inner), z, new_conv, final_state

    # --- inference (models/step.py) ----------------------------------------------------------------------
    def _step_one(self, x: Tensor, state: dict, step: Step) -> Tensor:
        """x (batch, hidden) -> (batch, hidden): conv-window update, then the recurrence with D and the gated
        norm in one op; ``state`` updated in place."""
        fns = step.fns
        b = x.shape[0]
        zxbcdt, xbc = project_in_conv(x, self.in_proj.weight, self.in_proj.bias, state["conv"],
                                      self.conv1d.weight[:, 0, :], self.conv1d.bias, self.d_z, self.activation, fns)
        z, _, dt_raw = self.split_in(zxbcdt)  # xbc: the conv's output, (batch, conv_dim)
        xs, Bs, Cs = torch.split(xbc, [self.d_x, self.d_B, self.d_C], dim=-1)
        gated = self.gated_norm
        y = fns["ssm_step_gated"](
            state["ssm"], xs.reshape(b, self.n_groups, self.headdim), Bs.reshape(b, self.n_groups, self.d_state),
            Cs.reshape(b, self.n_heads, self.d_state), dt_raw, self.dt_bias, self.A_log, self.D,
            z.reshape(b, self.n_heads, self.headdim) if gated and z is not None else None,
            self.norm.weight if gated else None,
            self.eps,
        )  # (batch, n_heads * headdim)
        return fns["gemv"](y.to(self.out_proj.weight.dtype), self.out_proj.weight, self.out_proj.bias)

    def _step_window(self, x: Tensor, win: Mamba2Window, step: Step) -> Tensor:
        """x (batch, T, hidden) -> (batch, T, hidden). ``step.rebase``: first replay ``step.keep`` (batch,) steps
        of the old window from the checkpoint, which becomes the new checkpoint, and start a new window; else
        append to the window (which then holds ``step.wlen`` entries) from the live state."""
        b, T, _ = x.shape
        slot = step.slot if step.slot is not None else win.slot
        if step.rebase:
            # the w1 conv inputs before the new window start keep entries into the buffer
            start, n_replay, offset, shift = win.ckpt, step.keep, 0, step.keep
            if step.slot is None:
                win.slot.bitwise_xor_(1)  # no runtime flips it for every layer at once
        else:
            wlen = step.wlen
            if wlen + T > win.window:
                raise RuntimeError(f"replay window holds {win.window} tokens; {wlen + T} were fed")
            start, n_replay, offset, shift = win.live, win.no_shift, wlen, win.no_shift
        # in_proj, then the conv over [buffered prefix, new inputs], the buffer rewritten from ``offset`` (it holds
        # only conv inputs, which the replay does not read): post (b, T, conv_dim) = silu(conv) of [x | B | C].
        zxbcdt, post = project_in_window_conv(x, self.in_proj.weight, self.in_proj.bias, win.conv, shift, offset,
                                              win.conv_w, self.conv1d.bias, self.d_z, self.activation, step.fns)
        z, _, dt_raw = self.split_in(zxbcdt)
        xs, _, B = win.split(post[..., : win.d_xB], dt_raw)
        C = post[..., win.d_xB :].view(b, T, self.n_heads, self.d_state)
        # the op reads the last window's steps from the other slot and writes these into ``slot``: no copies
        kw = {"return_final": False, "state_out": win.ckpt if step.rebase else None, "final_out": win.live,
              "slot": slot, "offset": offset, "read_old": step.rebase}
        old = win.split(win.win_xB, win.win_dt)
        if self.gated_norm:  # the gated norm in the replay op (in its kernel where a head fits one program)
            y, _, _ = step.fns["ssm_replay_gated"](start, *old, n_replay, xs, dt_raw, B, C, win.A, self.dt_bias,
                                                   self.D, z, self.norm.weight, self.eps, **kw)
        else:
            y, _, _ = step.fns["ssm_replay"](start, *old, n_replay, xs, dt_raw, B, C, win.A, self.dt_bias, self.D,
                                             **kw)
        return self.output(y.reshape(b, T, self.d_inner), z, step.fns["gemv"], normed=self.gated_norm)


class Mamba2Window(ReplayWindow):
    """Replay window of one Mamba-2 layer (docs/speculative.md): checkpoint, the last window's SSM inputs, a
    conv buffer.

    * ``ckpt``: the SSM state at the start of the last window, the last position known to be correct;
    * ``win_xB``, ``win_dt``: the post-conv [x | B] and raw dt (before dt_bias and softplus) of every step
      of the window, in two slots (2, batch, window, ...): a call writes its steps into the current slot
      (``slot``, or the step's) while the replay reads the last window from the other, so nothing is copied;
      a rebase flips the slot first;
    * ``conv``: the ``d_conv - 1`` conv inputs (pre-conv x, B, C) before the window, then the window's own;
    * ``live`` (``keep_live``, hybrid drafts): the state after the whole window, where "continue" steps start.

    ``window`` is the most tokens one window holds (K+1). Buffers are allocated once (CUDA graphs).
    """

    def __init__(self, mixer: Mamba2Mixer, batch_size: int, window: int, dtype, device, keep_live: bool):
        m = mixer
        b, w1 = batch_size, m.d_conv - 1
        self.mixer, self.window, self.w1 = m, window, w1
        self.d_xB = m.d_x + m.d_B
        self.ckpt = torch.zeros(b, m.n_heads, m.headdim, m.d_state, dtype=torch.float32, device=device)
        self.live = torch.zeros_like(self.ckpt) if keep_live else None
        self.win_xB = torch.zeros(2, b, window, self.d_xB, dtype=dtype, device=device)
        self.win_dt = torch.zeros(2, b, window, m.n_heads, dtype=dtype, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # used when no runtime hands one over
        self.conv = torch.zeros(b, m.conv_dim, w1 + window, dtype=dtype, device=device)
        self.no_shift = torch.zeros(b, dtype=torch.long, device=device)  # continue steps: no replay, no shift
        with torch.no_grad():
            self.A = -torch.exp(m.A_log.float())  # (nheads,): fixed while decoding
            self.conv_w = m.conv1d.weight[:, 0, :]  # (conv_dim, width)

    slotted = True  # the runtime hands every such window one slot tensor, flipped once per rebase walk

    def split(self, xB: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, dt, B) views of [x | B] (..., d_xB) and dt, as the replay op reads them: (..., groups, headdim),
        dt, (..., groups, dstate)."""
        m = self.mixer
        return (xB[..., : m.d_x].unflatten(-1, (m.n_groups, m.headdim)), dt,
                xB[..., m.d_x :].unflatten(-1, (m.n_groups, m.d_state)))


class GatedRMSNorm(nn.Module):
    """Parameter holder for the gated RMSNorm (``norm.weight``); the math is in ops.rmsnorm_gated."""

    def __init__(self, dim: int, eps: float, group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size = eps, group_size

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        return ops.rmsnorm_gated(y, z, self.weight, self.eps, self.group_size)


Mamba2Mixer.WINDOW = Mamba2Window
