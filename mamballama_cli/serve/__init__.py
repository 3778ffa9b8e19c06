"""`mamballama serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for hybrids and Transformers.

:mod:`.engine` owns the model on one worker thread and decodes waiting requests in batches on the static decoder;
:mod:`.app` is the HTTP side (routes, validation, server-sent events). docs/serve.md says how to use it.
"""
