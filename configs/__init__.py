"""Configs as code: each preset module has `get_config(arg) -> ml_collections.ConfigDict`.

Load one with `lm.config.load("configs/tiny.py:llama")` or `--config=configs/tiny.py:llama` on a command line; a
preset builds on `from configs import base`. Configs sit at the top of the imports (they may use any part of lm,
e.g. the filter defaults of lm.data.filter) and nothing in lm imports them: lm.config loads them by path.
"""
