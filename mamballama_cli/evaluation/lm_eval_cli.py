"""lm-eval's own CLI with ``--model mamballama`` available.

    python -m mamballama_cli.evaluation.lm_eval_cli run --model mamballama \\
        --model_args pretrained=DIR --tasks arc_easy,hellaswag --output_path out/
    mamballama-lm-eval ...            (the same, as a console script)

Every argument is lm-eval's; this wrapper only registers the model first (lm-eval discovers models
through its own registry and offers no plugin hook).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        import mamballama_cli.evaluation.lm_eval_model  # noqa: F401  (registers --model mamballama)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"error: lm-evaluation-harness is not installed ({exc}); run: pip install 'mamballama[eval]'",
              file=sys.stderr)
        sys.exit(1)
    cli_evaluate()


if __name__ == "__main__":
    main()
