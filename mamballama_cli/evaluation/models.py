"""Student and teacher for an eval run: resolved up front (cheap), loaded on first use (expensive)."""

from __future__ import annotations

from pathlib import Path

from mamballama_cli.errors import MamballamaError
from mamballama_cli.output import log

STUDENT, TEACHER = "student", "teacher"


def recorded_teacher(config) -> str | None:
    """The TEACHER spec a hybrid records (config.teacher); 'default' for the embedded one."""
    info = getattr(config, "teacher", None) or {}
    if not isinstance(info, dict) or not info.get("name_or_path"):
        return None
    if info.get("kind") == "default":
        return "default"
    return str(info["name_or_path"])


def resolve_checkpoint(spec: str, what: str) -> Path:
    """A local checkpoint directory for a MODEL/--teacher spec ('default', a directory, or a hub id)."""
    from mamballama_cli.loading import checkpoint_dir

    if spec == "default" or Path(spec).expanduser().exists():
        return checkpoint_dir(spec)
    from mamballama_cli.convert.teacher import resolve_teacher

    try:
        source = resolve_teacher(spec)
    except MamballamaError as exc:
        raise MamballamaError(f"{what} {spec!r}: {exc}") from exc
    if source.kind == "gguf":
        raise MamballamaError(f"{what} {spec!r} is a GGUF file; eval needs a safetensors checkpoint directory "
                              "(convert it with `mamballama convert` or save it with transformers)")
    return checkpoint_dir(str(source.path))


class ModelPair:
    """Student (MODEL) and optional teacher; ``get(role)`` loads a model the first time it is needed."""

    def __init__(self, model: str, teacher: str | None, dtype: str, device: str):
        from transformers import AutoConfig

        import mamballama_cli  # noqa: F401  (registers model_type mamballama)

        self.dtype_name, self.device_name = dtype, device
        self.specs: dict[str, str] = {STUDENT: model}
        self.paths: dict[str, Path] = {STUDENT: resolve_checkpoint(model, "MODEL")}
        self.configs = {STUDENT: AutoConfig.from_pretrained(str(self.paths[STUDENT]))}
        if teacher is None:
            teacher = recorded_teacher(self.configs[STUDENT])
            if teacher is not None:
                log(f"teacher: {teacher} (recorded in {self.paths[STUDENT] / 'config.json'}; --teacher overrides)")
            elif self.configs[STUDENT].model_type == "mamballama":
                log("warning: this hybrid records no teacher; pass --teacher DIR to compare against one")
        if teacher is not None and teacher.lower() != "none":
            try:
                self.paths[TEACHER] = resolve_checkpoint(teacher, "--teacher")
            except MamballamaError as exc:
                raise MamballamaError(f"{exc}; pass --teacher DIR (or --teacher none to evaluate the model alone)") \
                    from exc
            self.specs[TEACHER] = teacher
            self.configs[TEACHER] = AutoConfig.from_pretrained(str(self.paths[TEACHER]))
        self._loaded: dict[str, tuple] = {}

    @property
    def roles(self) -> list[str]:
        return [r for r in (TEACHER, STUDENT) if r in self.paths]

    @property
    def has_teacher(self) -> bool:
        return TEACHER in self.paths

    def name(self, role: str) -> str:
        """A short model id for answer files: the checkpoint folder name."""
        spec = self.specs[role]
        if spec == "default":
            return self.paths[role].name
        return Path(spec).expanduser().resolve().name if Path(spec).expanduser().exists() else spec.replace("/", "--")

    def distill_length(self) -> int | None:
        return getattr(self.configs[STUDENT], "distill_max_length", None)

    def get(self, role: str):
        """(model, tokenizer) in eval mode on the run's device."""
        if role not in self._loaded:
            from mamballama_cli.loading import load_causal_lm

            log(f"loading {role} {self.specs[role]} ...")
            model, tok, _ = load_causal_lm(str(self.paths[role]), dtype=self.dtype_name, device=self.device_name)
            if tok is None:
                raise MamballamaError(f"{role} {self.specs[role]!r} has no tokenizer files; copy the teacher's "
                                      "tokenizer into it")
            self._loaded[role] = (model, tok)
        return self._loaded[role]

    def device(self):
        from mamballama_cli.loading import resolve_device

        return resolve_device(self.device_name)

    def torch_dtype(self):
        from mamballama_cli.loading import resolve_dtype

        return resolve_dtype(self.dtype_name, self.device())
