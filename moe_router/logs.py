"""Quiet third-party chatter in the project's entry points (scripts, CLI, server).

Lightning prints accelerator lines and a product tip at INFO, sentence-transformers logs model
loading at INFO, transformers draws a weight-loading bar, and Lightning's pytree shim warns
about a torch deprecation that does not concern users. None of it says anything about the run.
Library code never calls this: only the entry points do, so users embedding moe_router keep
their own logging setup.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "sentence_transformers", "transformers", "httpx")


def quiet_libraries() -> None:
    """Raise the noisy libraries' loggers to WARNING, hide Hugging Face progress bars and the LeafSpec warning."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    try:  # transformers draws its weight-loading bar through its own switch
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
