"""Tuning tables: what a process's autotuners and per-shape timed choices settled on, kept in a JSON file and given
back to a later process on the same code, software and GPU, which then times nothing the table holds and compiles
only the tiles it runs.

On a machine without Triton's cache, the first call of each shape compiles every candidate tile its autotuner offers
(13 for a several-row GEMV, 7 for one row, 8 for the Mamba-2 step), then times the kernel against cuBLAS or the ops
apart in CUDA graphs. At the 8B shape a verify benchmark spends minutes on that before it measures anything (the
thirty-sixth session's H100 ran out of 240 s compiling). With a table, each shape's first call finds its tile and its
choice already made.

A table is used only where it was made: its fingerprint (the Triton and torch versions, the GPU's name) must equal
this process's, else it is set aside with the reason and everything is timed as before. Each autotuner's and choice
table's entries also carry the hash of the code they were timed on: the module that registered them and the ``ops/``
modules it imports, comments and docstrings aside (:func:`code_hash`). Where that code has changed since, those
entries alone are timed again, and the rest of the table is used. Entries the table lacks are timed as before too,
and added when the table is saved.

Kernel modules hand over what they choose with :func:`register_tuner` (a ``triton.autotune`` object: its ``cache``
maps a shape's key to a config) and :func:`register_choices` (a dict of per-shape choices: key -> bool or tile
tuple). :func:`use` seeds them from a table, now and as later modules register; :func:`snapshot` reads them back;
:func:`open_table` does both around a command or benchmark (the CLI's global ``--tuning FILE``). Plain Python."""

from __future__ import annotations

import ast
import atexit
import functools
import hashlib
import io
import json
import os
import sys
import tokenize
from pathlib import Path

import torch

FORMAT = 2  # 2: a code hash per autotuner and choice table (1, before 2026-12-07: one hash of all of ops/)
OPS = Path(__file__).resolve().parent
ENV = "MAMBALLAMA_TUNING"  # the table a worker process started by accelerate or DeepSpeed opens (set by open_table)
TUNERS: dict[str, object] = {}  # name -> autotuner
CHOICES: dict[str, dict] = {}  # name -> per-shape choices
SOURCES: dict[tuple[str, str], str] = {}  # ("tuners" or "choices", name) -> the file of the module that registered it
STATE: dict = {"table": None, "file": None, "why": "no table given", "seeded": {"tuners": 0, "choices": 0}, "left": 0}


def _code(path: Path) -> bytes:
    """A source file as a code hash reads it: the text with its comments and docstrings cut out, trailing spaces and
    empty lines dropped. So an edit to a comment or a docstring (the measured numbers they quote) leaves the tables
    made before it in use, and every Python reads the same bytes (a syntax tree's dump differs between versions)."""
    text = Path(path).read_text()
    lines = [line.encode() for line in text.split("\n")]
    cuts = []  # (row, byte column) of each start and end, rows from 1
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            d = body[0]  # ast's columns count UTF-8 bytes
            cuts.append((d.lineno, d.col_offset, d.end_lineno, d.end_col_offset))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:  # tokenize's columns count characters
            (row, col), (_, end) = tok.start, tok.end
            line = tok.line.split("\n")[0] if tok.line else text.split("\n")[row - 1]
            cuts.append((row, len(line[:col].encode()), row, len(line[:end].encode())))
    for r0, c0, r1, c1 in sorted(cuts, reverse=True):  # from the end, so that earlier positions hold
        lines[r0 - 1:r1] = [lines[r0 - 1][:c0] + lines[r1 - 1][c1:]]
    return b"\n".join(line.rstrip() for line in lines if line.strip())


def _imports(path: Path) -> set[Path]:
    """The ``ops/`` modules a source file imports (at its top or inside a function), this one and the package's
    ``__init__`` (the dispatch registry, no kernel) aside."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "mamballama_cli.ops":
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mamballama_cli.ops."):
            names = [node.module.split(".")[2]]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:  # relative, from inside ops/
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[2] for a in node.names if a.name.startswith("mamballama_cli.ops.")]
        found |= {OPS / f"{n}.py" for n in names if (OPS / f"{n}.py").is_file()}
    return found - {OPS / "tuning.py", OPS / "__init__.py"}


@functools.cache
def code_hash(path: str) -> str:
    """The hash of the code a kernel module's tunings depend on: the module and every ``ops/`` module it imports,
    transitively (:func:`_imports`), each read by :func:`_code`."""
    seen, todo = set(), [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_imports(p) - seen)
    code = hashlib.sha256()
    for p in sorted(seen):
        code.update(p.name.encode() + b"\0" + _code(p) + b"\0")
    return code.hexdigest()[:16]


def _hash_of(part: str, name: str) -> str | None:
    source = SOURCES.get((part, name))
    return code_hash(source) if source else None


def fingerprint(device=None) -> dict:
    """What a whole table must have been made on: Triton's and torch's versions and the GPU's name (``cpu`` off
    CUDA). The code each entry was timed on is checked per autotuner and choice table (:func:`code_hash`)."""
    try:
        import triton
        version = triton.__version__
    except ImportError:
        version = None
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return {"triton": version, "torch": torch.__version__, "device": name}


def _enc(v):
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, (tuple, list)):
        return [_enc(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"a tuning key holds {type(v).__name__} {v!r}, which a table cannot keep")


def _dec(v):
    if isinstance(v, dict):
        return getattr(torch, v["dtype"])
    if isinstance(v, list):
        return tuple(_dec(x) for x in v)
    return v


def config_id(config) -> dict:
    """An autotuner config as the table writes it: its constexprs, warps, stages and CTAs."""
    return {"kwargs": dict(sorted(config.kwargs.items())), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1)}


def _rows(pairs) -> list:
    """[key, value] rows as a table writes them; a pair a file cannot hold is left out (timed again next time)."""
    rows = []
    for key, value in pairs:
        try:
            rows.append([_enc(key), value if isinstance(value, dict) else _enc(value)])
        except TypeError:
            continue
    return rows


def snapshot() -> dict:
    """Every registered autotuner's and choice table's entries, with this process's fingerprint. Choices that are not
    a decision (a shape run off CUDA, its key's device index None, remembered as True untimed) are left out with the
    rest of what a table cannot keep."""
    tuners = {name: _rows((k, config_id(c)) for k, c in getattr(tuner, "cache", {}).items())
              for name, tuner in TUNERS.items()}
    choices = {name: _rows((k, v) for k, v in table.items()
                           if isinstance(v, (bool, tuple)) and not (isinstance(k, tuple) and k and k[-1] is None))
               for name, table in CHOICES.items()}
    tuners, choices = {n: r for n, r in tuners.items() if r}, {n: r for n, r in choices.items() if r}
    code = {part: {n: {"module": Path(SOURCES[(part, n)]).name, "hash": _hash_of(part, n)}
                   for n in rows if (part, n) in SOURCES}
            for part, rows in (("tuners", tuners), ("choices", choices))}
    return {"format": FORMAT, "fingerprint": fingerprint(), "code": code, "tuners": tuners, "choices": choices}


def _same_code(table: dict, part: str, name: str) -> bool:
    """Whether ``table``'s entries for ``name`` were timed on the code this process runs (for a name no module of
    this process registered: the code of the module the table names, where ``ops/`` has it)."""
    made = table.get("code", {}).get(part, {}).get(name)
    if made is None:
        return False
    here = _hash_of(part, name)
    if here is None and (OPS / made["module"]).is_file():
        here = code_hash(str(OPS / made["module"]))
    return here == made["hash"]


def _changed(part: str, name: str) -> bool:
    """True (and the entries counted as stale, the name kept for the report) where the open table's entries for
    ``name`` were timed on other code."""
    rows = STATE["table"][part].get(name, [])
    if not rows or _same_code(STATE["table"], part, name):
        return False
    STATE["left"] += len(rows)
    STATE.setdefault("changed", set()).add(name)
    return True


def _seed_tuner(name: str, tuner) -> None:
    if _changed("tuners", name):
        return
    by_id = {json.dumps(config_id(c), sort_keys=True): c for c in getattr(tuner, "configs", [])}
    for key, cid in STATE["table"]["tuners"].get(name, []):
        config = by_id.get(json.dumps(cid, sort_keys=True))
        if config is None:  # the candidates changed since: timed as before
            STATE["left"] += 1
            continue
        tuner.cache.setdefault(_dec(key), config)
        STATE["seeded"]["tuners"] += 1


def _seed_choices(name: str, table: dict) -> None:
    if _changed("choices", name):
        return
    for key, value in STATE["table"]["choices"].get(name, []):
        table.setdefault(_dec(key), _dec(value))
        STATE["seeded"]["choices"] += 1


def _pending() -> bool:
    """On the first registration: check the table :func:`open_table` read (or a parent process named, :data:`ENV`)
    against this process's fingerprint, which needs the GPU that only a kernel module's import implies. True where it
    was checked now (and every registered table seeded)."""
    if STATE["file"] is None and os.environ.get(ENV):
        STATE["file"] = os.environ[ENV]
        try:
            STATE["pending"] = read(STATE["file"])
        except ValueError as exc:  # a kernel module's import must not fail over it: timed as before, and why
            STATE["why"] = f"set aside: {exc}"
    if "pending" not in STATE:
        return False
    _activate(STATE.pop("pending"))
    return True


def _differs(table: dict, here: dict) -> list[str]:
    """The fingerprint's fields where ``table`` was made on other software or another GPU than ``here``."""
    return [k for k in here if table["fingerprint"].get(k) != here[k]]


def _activate(table: dict | None) -> None:
    here = fingerprint()
    if table is None:
        STATE["why"] = "no table there yet: everything is timed, and the table is written at the end"
    elif table["format"] != FORMAT:
        STATE["why"] = f"set aside: an older table (format {table['format']}); everything is timed as before"
        print(f"note: --tuning {STATE['file']}: {STATE['why']}", file=sys.stderr)
    elif diff := _differs(table, here):
        STATE["why"] = f"set aside: made with another {', '.join(diff)}; everything is timed as before"
        print(f"note: --tuning {STATE['file']}: {STATE['why']}", file=sys.stderr)
    else:
        STATE["table"] = table
        STATE["why"] = "used"
        for name, tuner in TUNERS.items():
            _seed_tuner(name, tuner)
        for name, choices in CHOICES.items():
            _seed_choices(name, choices)


def _source(part: str, name: str, source: str | None) -> None:
    """Where the code of ``name``'s tunings is; code run from no file (``python -c``) has none, and its entries are
    then kept in no table."""
    if source:
        SOURCES[part, name] = source
    else:
        SOURCES.pop((part, name), None)


def register_tuner(name: str, tuner, source: str | None = None) -> None:
    """Hand over an autotuner under a name unique in the package; seeded at once if a table is open. ``source``: the
    file whose code the tunings depend on (by default the calling module's)."""
    TUNERS[name] = tuner
    _source("tuners", name, source or sys._getframe(1).f_globals.get("__file__"))
    if not _pending() and STATE["table"] is not None:
        _seed_tuner(name, tuner)


def register_choices(name: str, table: dict, source: str | None = None) -> None:
    """Hand over a per-shape choices dict under a name unique in the package; seeded at once if a table is open.
    ``source``: as for :func:`register_tuner`."""
    CHOICES[name] = table
    _source("choices", name, source or sys._getframe(1).f_globals.get("__file__"))
    if not _pending() and STATE["table"] is not None:
        _seed_choices(name, table)


def read(path) -> dict | None:
    """The table at ``path``, or None if there is none there; a file that is not a table is an error naming it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tuning {path}: not a tuning table ({exc}); give a file `--tuning` wrote, or a new "
                         f"name") from None
    if (not isinstance(table, dict) or table.get("format") not in range(1, FORMAT + 1)
            or not {"fingerprint", "tuners", "choices"} <= set(table)):
        raise ValueError(f"--tuning {path}: not a tuning table (format 1 to {FORMAT}); give a file `--tuning` wrote, "
                         f"or a new name")
    return table  # an older format is set aside when it is opened, and written over when a table is saved


def use(path) -> str:
    """Open the table at ``path`` for this process now: seed every registered autotuner and choice table from it
    where its fingerprint is this process's (and those that register later). Returns what happened, in words."""
    STATE["file"] = str(path)
    STATE.pop("pending", None)
    _activate(read(path))
    return STATE["why"]


def save(path) -> int:
    """Write this process's table to ``path`` (atomically), keeping the entries of the table there where it has this
    process's fingerprint. Returns the number of entries written; writes nothing where there are none."""
    path = Path(path)
    table = snapshot()
    try:
        old = read(path)
    except ValueError:
        old = None
    if old is not None and old["format"] == FORMAT and old["fingerprint"] == table["fingerprint"]:
        for part in ("tuners", "choices"):
            for name, rows in old[part].items():
                if not _same_code(old, part, name):  # timed on other code: this run's entries alone
                    continue
                have = {json.dumps(r[0]) for r in table[part].get(name, [])}
                table[part].setdefault(name, []).extend(r for r in rows if json.dumps(r[0]) not in have)
                table["code"][part].setdefault(name, old["code"][part][name])
    count = sum(len(rows) for part in ("tuners", "choices") for rows in table[part].values())
    if count:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        os.replace(tmp, path)
    return count


def open_table(path) -> None:
    """The CLI's ``--tuning FILE``: read the table at ``path`` now (a file that is not a table is an error before any
    work), check and seed it when the first kernel module registers (on a GPU; nothing happens on CPU), name it to
    worker processes (:data:`ENV`), and save this process's table there when it exits."""
    STATE["file"], STATE["pending"] = str(path), read(path)
    STATE["why"] = "not used: no GPU kernel ran"
    os.environ[ENV] = str(path)
    atexit.register(_save_at_exit, path)


def _save_at_exit(path) -> None:
    """The end of a run with ``--tuning`` (also after Ctrl-C or a benchmark's deadline): its table written back, or
    one line saying why not; never an exit status of its own."""
    if not (TUNERS and torch.cuda.is_available()):
        return
    try:
        save(path)
    except Exception as exc:  # noqa: BLE001 - the run's own result stands; the table is only a time-saver
        print(f"note: --tuning {path}: not written ({type(exc).__name__}: {exc})", file=sys.stderr)


def check(path) -> dict:
    """What the table at ``path`` holds and whether this machine would use it (``mamballama --tuning FILE env``):
    its entries, the fingerprint it was made with and the fields where this process's differs (none: it is used)."""
    table = read(path)
    if table is None:
        return {"file": str(path), "entries": 0, "made_with": None, "differs": [], "status": "no table there yet"}
    differs = _differs(table, fingerprint()) + (["format"] * (table["format"] != FORMAT))
    changed = [] if table["format"] != FORMAT else sorted(
        {n for part in ("tuners", "choices") for n in table[part] if not _same_code(table, part, n)})
    status = f"set aside here: made with another {', '.join(differs)}" if differs else "used here"
    if changed and not differs:
        status += f", but for {', '.join(changed)} (their code changed since: timed again)"
    return {"file": str(path), "entries": sum(len(r) for part in ("tuners", "choices") for r in table[part].values()),
            "made_with": table["fingerprint"], "differs": differs, "code_changed": changed, "status": status}


def report() -> dict:
    """For a benchmark's JSON: which table was given, whether it was used (or why not) and how much it seeded."""
    return {"file": STATE["file"], "status": STATE["why"], "seeded": dict(STATE["seeded"]),
            "stale_entries": STATE["left"], "code_changed": sorted(STATE.get("changed", ()))}
