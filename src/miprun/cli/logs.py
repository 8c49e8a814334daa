"""Log lines and progress bars of a command: miprun's through rich, the libraries' silenced by ``-q``."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.logging import RichHandler


def setup_logging(console: Console, quiet: bool) -> None:
    """miprun's log lines on ``console`` (warnings only with ``quiet``), and the libraries quiet too."""
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    logging.getLogger("miprun").setLevel(level)
    logging.getLogger("huggingface_hub").propagate = False  # it prints its own lines; not each one twice
    if quiet:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """``-q``: the libraries' own bars (transformers' "Loading weights", the hub's downloads, datasets'),
    their info and warning lines, and Python warnings stay off until :func:`main` returns."""
    import warnings

    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    hub_logging.set_verbosity_error()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


QUIET_LOGGERS = ("datasets", "lm-eval", "lm_eval", "accelerate", "transformers", "huggingface_hub")


@contextlib.contextmanager
def libraries_restored() -> Iterator[None]:
    """After a command, the libraries' bars, log levels and warning filters as they were before it (``-q``
    changes them process-wide), for a process that runs :func:`main` more than once (tests, notebooks)."""
    import warnings

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars = _library_bars()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        for name, level in levels.items():  # a library not configured yet gets its own default, WARNING
            logging.getLogger(name).setLevel(level or logging.WARNING)
        if bars.get("transformers") and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        if bars.get("huggingface_hub") and "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


def _library_bars() -> dict[str, bool]:
    """Whether transformers' and the hub's progress bars are on (on when the library is not imported yet)."""
    on = {"transformers": True, "huggingface_hub": True}
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        on["transformers"] = hf_logging.is_progress_bar_enabled()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled

        on["huggingface_hub"] = not are_progress_bars_disabled()
    return on
