"""lm-evaluation-harness model ``mamballama``: any checkpoint mamballama loads, hybrid or plain Transformer.

Importing this module registers the name with lm-eval's model registry. lm-eval has no plugin
entry point for models, so its own CLI needs the tiny wrapper ``python -m
mamballama_cli.evaluation.lm_eval_cli`` (or the ``mamballama-lm-eval`` script), which imports this
module and then runs lm-eval's CLI unchanged:

    mamballama-lm-eval run --model mamballama --model_args pretrained=runs/h50,dtype=float32 --tasks arc_easy

``pretrained`` is a checkpoint directory or ``default`` (the embedded teacher), resolved through
mamballama_cli.loading; ``dtype`` and ``device`` default to mamballama's choices (float32 on CPU,
bfloat16 on GPU). Everything else is lm-eval's ``hf`` model (batching, accelerate data parallel,
chat templates, generation), which works unchanged because the hybrid is a regular transformers
causal LM once mamballama_cli is imported.
"""

from __future__ import annotations

import logging

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import mamballama_cli  # noqa: F401  (registers model_type mamballama with transformers' Auto classes)
from mamballama_cli.errors import UsageError

MODEL_NAME = "mamballama"
eval_logger = logging.getLogger(__name__)


@register_model(MODEL_NAME)
class MamballamaLM(HFLM):
    """lm-eval's HFLM with mamballama's checkpoint resolution and defaults."""

    def __init__(self, pretrained="default", dtype=None, device=None, trust_remote_code=False, **kwargs):
        if trust_remote_code not in (False, None, "False", "false"):
            raise UsageError("--model mamballama never runs remote code; drop trust_remote_code")
        kwargs.pop("backend", None)
        if isinstance(pretrained, str):
            from mamballama_cli.loading import checkpoint_dir, resolve_device, resolve_dtype

            path = checkpoint_dir(pretrained)
            import torch

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda:0 unless told otherwise; like its hf model, fall back
                eval_logger.warning("device %s requested but CUDA is not available; using the CPU", device)
                device = "cpu"
            dev = resolve_device(device or "auto")
            super().__init__(pretrained=str(path), dtype=resolve_dtype(str(dtype or "auto"), dev), device=str(dev),
                             backend="causal", trust_remote_code=False, **kwargs)
        else:  # an already loaded model (the in-process `mamballama eval` report passes one)
            super().__init__(pretrained=pretrained, backend="causal", trust_remote_code=False, **kwargs)
