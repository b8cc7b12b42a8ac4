"""lm.serve: a local web chat and an OpenAI-compatible API over the models of a workdir.

    python -m lm.serve --workdir=W [--host=127.0.0.1 --port=8000 --max_batch=16 --preload]

Open the printed URL for the chat page; point any OpenAI client at URL/v1 (any api_key). The pieces:
lm.serve.engine (the models found in W, the engine thread that batches requests into lm.sample.stream),
lm.serve.text (generated tokens -> content / reasoning deltas, stop strings), lm.serve.app (the FastAPI app),
lm.serve.__main__ (the program), lm/serve/static (the page: plain HTML, CSS and JavaScript, no external assets).
"""
