"""Data utilities: AE pretraining corpus, multi-document QA examples, bundled data paths.

The bundled files live in the repository's ``data/`` folder (next to ``gmsa_rag/``);
set ``GMSA_RAG_DATA_DIR`` to point elsewhere (e.g. when the package is installed
without the source checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parents[2]
DATA_DIR: Path = Path(os.environ.get("GMSA_RAG_DATA_DIR", REPO_ROOT / "data"))

#: Bundled English prose corpus for autoencoder pretraining (jsonl.gz, field ``text``).
DEFAULT_AE_CORPUS: Path = DATA_DIR / "ae-corpus" / "prose.jsonl.gz"
#: Bundled multi-document NQ QA set: ``train.jsonl.gz`` and ``dev.jsonl.gz``.
DEFAULT_QA_DIR: Path = DATA_DIR / "nq-multidoc"

__all__ = ["REPO_ROOT", "DATA_DIR", "DEFAULT_AE_CORPUS", "DEFAULT_QA_DIR"]
