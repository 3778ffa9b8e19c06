"""The models the speed benchmark (evaluation/speed.py) times, built one at a time: the hybrid (a checkpoint or a
named shape with random weights), the transformers teacher, and the teacher as an all-attention hybrid."""

from __future__ import annotations

from mamballama_cli.errors import UsageError
from mamballama_cli.evaluation.speed_device import free_memory


class SpeedModels:
    """Builds one model at a time: the hybrid, the transformers teacher, the teacher as an all-attention
    hybrid (for the static engine)."""

    def __init__(self, cfg, device, dtype):  # cfg: the run's SpeedConfig
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.describe: dict = {}

    def hybrid(self):
        import torch

        from mamballama_cli.models.modeling import MamballamaForCausalLM

        if self.cfg.shape:
            from mamballama_cli.convert.placement import resolve_attention_layers
            from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config

            tc = teacher_config(self.cfg.shape)
            hc = hybrid_config(tc, resolve_attention_layers(tc.num_hidden_layers, self.cfg.ratio,
                                                            self.cfg.attn_layers),
                               **({} if self.cfg.gate else {"mamba_gate": False}))
            self.describe.update(shape=self.cfg.shape, attn_layers=hc.attn_layers, mamba_gate=hc.mamba_gate)
            return random_model(MamballamaForCausalLM, hc, self.dtype, self.device, self.cfg.seed)
        from mamballama_cli.loading import checkpoint_dir
        from transformers import AutoModelForCausalLM

        import mamballama_cli  # noqa: F401

        path = checkpoint_dir(self.cfg.model)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        if not isinstance(model, MamballamaForCausalLM):
            raise UsageError(f"--model {self.cfg.model}: not a mamballama hybrid ({type(model).__name__}); "
                             "pass a checkpoint written by convert/distill")
        self.describe.update(model=str(path), attn_layers=model.config.attn_layers)
        torch.manual_seed(self.cfg.seed)
        return model

    def teacher_path(self):
        if self.cfg.teacher:
            return self.cfg.teacher
        if self.cfg.model:
            from mamballama_cli.loading import checkpoint_dir
            from transformers import AutoConfig

            import mamballama_cli  # noqa: F401

            cfg = AutoConfig.from_pretrained(str(checkpoint_dir(self.cfg.model)))
            name = (getattr(cfg, "teacher", None) or {}).get("name_or_path")
            return name
        return None

    def teacher(self):
        """The transformers teacher (random weights at the shape, or the checkpoint)."""
        if self.cfg.shape:
            from transformers import LlamaForCausalLM

            from mamballama_cli.evaluation.shapes import random_model, teacher_config

            return random_model(LlamaForCausalLM, teacher_config(self.cfg.shape), self.dtype, self.device,
                                self.cfg.seed)
        spec = self.teacher_path()
        if not spec:
            return None
        from mamballama_cli.convert.teacher import load_teacher

        loaded = load_teacher(spec, dtype=self.dtype, allow_download=False)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        self.describe["teacher"] = spec
        return model.to(self.device).eval()

    def teacher_as_hybrid(self):
        """The teacher with every layer kept as attention, in the hybrid class (exactly the teacher)."""
        from mamballama_cli.models.modeling import MamballamaForCausalLM

        if self.cfg.shape:
            from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config

            tc = teacher_config(self.cfg.shape)
            hc = hybrid_config(tc, list(range(tc.num_hidden_layers)))
            return random_model(MamballamaForCausalLM, hc, self.dtype, self.device, self.cfg.seed)
        teacher = self.teacher()
        if teacher is None:
            return None
        from mamballama_cli.convert.converter import convert_model

        hybrid, _ = convert_model(teacher, list(range(teacher.config.num_hidden_layers)), dtype=self.dtype)
        del teacher
        free_memory(self.device, collect=True)
        return hybrid.to(self.device).eval()
