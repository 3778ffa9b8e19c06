"""Mamba-1 mixer initialised from attention (the seed paper's strongest chat model; docs/mamba1.md).

Sizes: n_h query heads, n_kv KV heads (r = n_h / n_kv), head dim d, d_state N = 16, d_inner = n_h * d.
Each head's d channels form d / N groups of N channels; a group shares one B and one C (N numbers each).

Per token:
    [z, x, B, C, dt_low] = in_proj(h)     z: n_h*d   x: n_kv*d (W_V)   B: n_kv*d (W_K)   C: n_h*d (W_Q)   dt_low: R
    x  = silu(causal_conv1d(x))           depthwise over the n_kv*d channels of x only
    dt = softplus(dt_proj(dt_low))        dt_proj: R -> d_inner with bias (Mamba-1's low-rank dt, R = ceil(H/16))
    GQA at head granularity: query head i reads x and B of KV head i // r, its own C; group j of head i
    pairs C = q[i, jN:(j+1)N] with B = k[i // r, jN:(j+1)N] and channels x[i // r, jN:(j+1)N]
    per channel c: h_t[c] = exp(dt[c] A[c]) h_{t-1}[c] + dt[c] x[c] B[g(c)];  y[c] = h_t[c] . C[g(c)] + D[c] x[c]
    out = out_proj(y * silu(z))

With A = 0, dt = 1, an identity conv, no gate and D = 0 each group is exactly an unnormalised causal linear
attention head of dimension N built from the teacher's W_Q, W_K, W_V rows, mixed by W_O
(tests/test_mamba1.py::test_degenerate_mamba1_is_blockwise_linear_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamballama_cli import ops
from mamballama_cli.errors import MamballamaError
from mamballama_cli.models.mixers import AttentionInitMixer, inverse_softplus
from mamballama_cli.models.step import ReplayWindow, Step, project_in
from mamballama_cli.ops import selective_scan as sscan


class Mamba1Mixer(AttentionInitMixer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.n_kv = config.mamba_n_groups
        self.d_state = config.mamba1_d_state
        self.dt_rank = config.mamba1_dt_rank
        # Mamba-1 has no norm before out_proj; ``mamba_gated_norm=False`` drops the gate (as it drops the
        # Mamba-2 gate and norm), which the degenerate linear-attention test needs.
        self.gated = config.mamba_gated_norm
        group_size = getattr(config, "mamba1_group_size", self.d_state)
        if group_size != self.d_state:
            raise MamballamaError(
                f"mamba1_group_size={group_size} must equal mamba1_d_state={self.d_state}: each group of channels "
                f"takes its d_state numbers of B and C from as many rows of W_K and W_Q; set both to the same value"
            )
        if self.headdim % self.d_state:
            raise MamballamaError(
                f"--mixer mamba1 needs the head dim ({self.headdim}) to be a multiple of mamba1_d_state "
                f"({self.d_state}), since B and C take d_state rows of W_K / W_Q per group; use --mixer mamba2"
            )
        if self.n_heads % self.n_kv:
            raise MamballamaError(f"mamba_n_heads={self.n_heads} is not a multiple of mamba_n_groups={self.n_kv}")

        self.d_inner = self.n_heads * self.headdim
        self.d_x = self.n_kv * self.headdim
        self.groups_per_head = self.headdim // self.d_state
        self.n_bc_groups = self.n_heads * self.groups_per_head  # groups of the scan (after GQA expansion)
        d_in_proj = self.d_inner + 2 * self.d_x + self.d_inner + self.dt_rank
        self.in_proj = nn.Linear(self.hidden_size, d_in_proj, bias=config.mamba_proj_bias)
        self.conv1d = self.depthwise_conv(self.d_x, config.mamba_conv_bias)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        self.init_ssm_parameters()

    # --- layout ------------------------------------------------------------------------------------------
    FRESH_PARAMS = ("conv1d.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D")

    def in_proj_sizes(self) -> dict[str, int]:
        """Rows of in_proj.weight: z, x, B, C, dt (dt holds the dt_rank low-rank rows), in the teacher's own
        head-major row order for x (W_V), B (W_K) and C (W_Q)."""
        return {"z": self.d_inner, "x": self.d_x, "B": self.d_x, "C": self.d_inner, "dt": self.dt_rank}

    # --- initialisation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_ssm_parameters(self, init_mod=None) -> None:
        """Mamba-1's initialisation of the SSM parameters.

        dt_proj.weight ~ U[-R^-1/2, R^-1/2]; dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        per channel; A_log[c, n] = log(n + 1) (S4D-real: A = -1, -2, ..., -N for every channel); D = 1.
        ``init_mod`` is transformers' guarded ``initialization`` module when called from ``_init_weights``
        (it skips parameters already loaded from a checkpoint); plain in-place writes otherwise.
        """
        if self.A_log.device.type == "meta":
            return
        bound = self.dt_rank**-0.5
        (init_mod or nn.init).uniform_(self.dt_proj.weight, -bound, bound)
        dt = self.sample_dt(self.d_inner)
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        values = {
            self.dt_proj.bias: inverse_softplus(dt),
            self.A_log: torch.log(A),
            self.D: torch.ones(self.d_inner),
        }
        self.write_initial(values, init_mod)

    # --- state -------------------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, dtype: torch.dtype, device) -> dict[str, Tensor]:
        """conv: the last d_conv - 1 inputs of x (n_kv * d channels); ssm: (d_inner, d_state) in float32."""
        return {
            "conv": torch.zeros(batch_size, self.d_x, self.d_conv - 1, dtype=dtype, device=device),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32, device=device),
        }

    # --- forward -----------------------------------------------------------------------------------------
    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.d_x, self.d_x, self.d_inner, self.dt_rank], dim=-1)

    def expand_x(self, x: Tensor) -> Tensor:
        """(..., n_kv * d) -> (..., n_h * d): the channels of query head i are those of KV head i // r."""
        r = self.n_heads // self.n_kv
        if r == 1:
            return x
        lead = x.shape[:-1]
        x = x.reshape(*lead, self.n_kv, self.headdim).repeat_interleave(r, dim=-2)
        return x.reshape(*lead, self.d_inner)

    def bc_groups(self, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """B (..., n_kv * d), C (..., n_h * d) -> both (..., n_h * d / N, N), group j of head i at i * d/N + j.

        The d rows of a head split into d / N consecutive blocks of N; block j of query head i is paired with
        block j of KV head i // r. Repeating whole heads (not blocks of N channels) is what keeps every
        query row paired with the key row of the same index in its own KV head.
        """
        lead = B.shape[:-1]
        r = self.n_heads // self.n_kv
        B = B.reshape(*lead, self.n_kv, self.groups_per_head, self.d_state)
        if r > 1:
            B = B.repeat_interleave(r, dim=-3)
        B = B.reshape(*lead, self.n_bc_groups, self.d_state)
        C = C.reshape(*lead, self.n_bc_groups, self.d_state)
        return B, C

    def discretise_dt(self, dt_low: Tensor) -> Tensor:
        """dt_low (..., R) -> dt (..., d_inner), positive, float32 (bias added in float32, as Mamba-1 does)."""
        return F.softplus(F.linear(dt_low, self.dt_proj.weight).float() + self.dt_proj.bias.float())

    def ssm_inputs(self, zxbcdt: Tensor, conv_state: Tensor | None, mask: Tensor | None):
        """Shared by prefill and speculative verification: conv, split and discretisation.

        zxbcdt: (batch, seqlen, d_in_proj). Returns z (b, l, d_inner), x (b, l, n_kv * d) after conv and
        activation, B and C (b, l, n_h * d / N, N) already paired per query head, dt (b, l, d_inner) positive
        float32, and the new conv state (b, n_kv * d, d_conv - 1). Padded positions get x = 0 and dt = 0:
        they neither write to nor decay the state.
        """
        z, x, B, C, dt_low = self._split(zxbcdt)
        x, new_conv = ops.causal_conv1d(
            x.transpose(1, 2), self.conv1d.weight[:, 0, :], self.conv1d.bias, initial_state=conv_state,
            activation=self.activation,
        )
        x = x.transpose(1, 2)  # (b, l, n_kv * d)
        dt = self.discretise_dt(dt_low)
        if mask is not None:
            keep = mask[..., None].bool()
            x = torch.where(keep, x, torch.zeros_like(x))
            dt = torch.where(keep, dt, torch.zeros_like(dt))
        B, C = self.bc_groups(B, C)
        return z, x, B, C, dt, new_conv

    def gate(self, y: Tensor, z: Tensor) -> Tensor:
        """y (..., d_inner) -> y * silu(z) (no gate with ``mamba_gated_norm=False``)."""
        if self.gated:
            y = (y.float() * F.silu(z.float())).to(y.dtype)
        return y

    def scan(self, hidden: Tensor, carried: dict | None, mask: Tensor | None):
        zxbcdt = self.in_proj(hidden)
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        conv_state = carried["conv"] if carried is not None else None
        ssm_state = carried["ssm"] if carried is not None else None
        z, x, B, C, dt, new_conv = self.ssm_inputs(zxbcdt, conv_state, mask)
        y, final_state = sscan.selective_scan(
            self.expand_x(x), dt, A, B, C, chunk_size=self.chunk_size, D=self.D, initial_state=ssm_state
        )
        return y, z, new_conv, final_state

    # --- inference (models/step.py) ----------------------------------------------------------------------
    def _step_one(self, x: Tensor, state: dict, step: Step) -> Tensor:
        """x (batch, hidden) -> (batch, hidden); ``state`` updated in place."""
        z, xc, B, C, dt_low = self._split(project_in(x, self.in_proj.weight, self.in_proj.bias, step.fns))
        xc, new_conv = step.fns["causal_conv1d_update"](
            xc, state["conv"], self.conv1d.weight[:, 0, :], self.conv1d.bias, self.activation
        )
        state["conv"].copy_(new_conv)
        B, C = self.bc_groups(B, C)
        dt = self.discretise_dt(dt_low)
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        new_state, y = step.fns["selective_state_step"](state["ssm"], self.expand_x(xc), dt, A, B, C, self.D)
        state["ssm"].copy_(new_state)
        return self.output(y, z)

    def _step_window(self, x: Tensor, win: Mamba1Window, step: Step) -> Tensor:
        """x (batch, T, hidden) -> (batch, T, hidden). ``step.rebase``: first replay ``step.keep`` (batch,) steps
        of the old window from the checkpoint, which becomes the new checkpoint, and start a new window; else
        append to the current window (holding ``step.wlen`` entries) from the live state."""
        T = x.shape[1]
        z, x_in, B, C, dt_low = self._split(project_in(x, self.in_proj.weight, self.in_proj.bias, step.fns))
        if step.rebase:  # the w1 conv inputs before the new window start ``keep`` entries into the buffer
            start, n_replay, offset, shift = win.ckpt, step.keep, 0, step.keep
            old = (win.win_x, win.win_dt, win.win_B)
        else:
            wlen = step.wlen
            if wlen + T > win.window:
                raise RuntimeError(f"replay window holds {win.window} tokens; {wlen + T} were fed")
            start, n_replay, offset, shift = win.live, win.no_shift, wlen, win.no_shift
            old = (win.win_x[:, :0], win.win_dt[:, :0], win.win_B[:, :0])
        # conv over [buffered prefix, new inputs], the buffer rewritten from ``offset`` in the same op (as the
        # Mamba-2 window does): no gather of the prefix, no copies into the buffer
        xs = step.fns["spec_conv"](x_in, win.conv, shift, offset, win.conv_w, self.conv1d.bias, self.activation)
        B, C = self.bc_groups(B, C)
        dt = self.discretise_dt(dt_low)
        y, _, _ = step.fns["selective_replay"](
            start, self.expand_x(old[0]), old[1], old[2], n_replay, self.expand_x(xs), dt, B, C, win.A, self.D,
            return_final=False, state_out=win.ckpt if step.rebase else None, final_out=win.live,
        )
        win.win_x[:, offset : offset + T].copy_(xs)
        win.win_dt[:, offset : offset + T].copy_(dt)
        win.win_B[:, offset : offset + T].copy_(B)
        return self.output(y, z)


class Mamba1Window(ReplayWindow):
    """Replay window of one Mamba-1 layer for speculative decoding (design.md section 4, docs/speculative.md).

    Holds the checkpoint (the SSM state at the start of the last window, the last position known correct),
    the last window's per-step SSM inputs (post-conv x at n_kv * d channels, positive dt, B already paired
    per query head) and a conv buffer: the d_conv - 1 conv inputs before the window, then the window's own.
    ``window`` is the most tokens one window holds (K + 1); every buffer is allocated once (CUDA graphs).
    """

    def __init__(self, mixer: Mamba1Mixer, batch_size: int, window: int, dtype, device, keep_live: bool):
        m = mixer
        b, w1 = batch_size, m.d_conv - 1
        self.mixer, self.window, self.w1 = m, window, w1
        self.ckpt = torch.zeros(b, m.d_inner, m.d_state, dtype=torch.float32, device=device)
        self.live = torch.zeros_like(self.ckpt) if keep_live else None  # state after the whole window
        self.win_x = torch.zeros(b, window, m.d_x, dtype=dtype, device=device)
        self.win_dt = torch.zeros(b, window, m.d_inner, dtype=torch.float32, device=device)
        self.win_B = torch.zeros(b, window, m.n_bc_groups, m.d_state, dtype=dtype, device=device)
        self.conv = torch.zeros(b, m.d_x, w1 + window, dtype=dtype, device=device)  # pre-conv x
        self.no_shift = torch.zeros(b, dtype=torch.long, device=device)  # continue steps: no replay, no shift
        with torch.no_grad():
            self.A = -torch.exp(m.A_log.float())  # (d_inner, N): fixed while decoding
            self.conv_w = m.conv1d.weight[:, 0, :]  # (d_x, width)


Mamba1Mixer.WINDOW = Mamba1Window
