"""Evaluation: what users need to trust a distilled model (design.md section 6).

- ``runner.run_eval``: the teacher-vs-student report behind ``mamballama eval MODEL ...``
  (perplexity / agreement / KL, passkey and needle-in-a-haystack grids, lm-evaluation-harness tasks;
  ``chat_tasks``: MT-Bench- and AlpacaEval-style answers judged through an OpenAI-compatible endpoint;
  ``speed_task``: a small run of the speed benchmark in ``speed``);
- ``lm_eval_model``: lm-eval's ``--model mamballama`` (``lm_eval_cli`` runs lm-eval's own CLI with it);
- ``judge_server``: a local OpenAI-compatible endpoint serving a checkpoint as judge, for offline machines.

Nothing here imports torch at package import; each module pulls what it needs.
"""
