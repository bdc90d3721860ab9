"""Library notices a ``marble`` user cannot act on: silenced, or shortened and said once.

- transformers' "``SiglipImageProcessor`` requires torchvision ... falling back" notices come
  from diffusers importing IP-adapter processors that marble-pl never uses: dropped.
- diffusers' "The following part of your input was truncated ..." repeats the cut text on every
  encode (800 KB for one 50,000-character prompt), and each tokenizer adds its own "Token indices
  sequence length is longer ...": said once, in one line, without the text.
- Lightning's "Tip" advertising its hosted logger: dropped.
- Lightning's "module(s) in eval mode" (the frozen VAE and text encoders stay in eval mode on
  purpose) and "ModelCheckpoint with manual optimization and every_n_train_steps" (checkpoints
  are taken after the manual optimizer step, which is what we want), and torch's ``LeafSpec``
  and ``all_gather`` deprecations raised inside Lightning (its ``all_gather`` under DDP): dropped.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["install_logging_filters", "install_notice_filters"]

_TORCHVISION_FALLBACK = "requires torchvision"
_TRUNCATED = ("part of your input was truncated", "Token indices sequence length is longer")
_LITLOGGER_TIP = "litlogger"

_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*ModelCheckpoint with manual optimization and every_n_train_steps.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*torch.distributed.nn.functional.all_gather is deprecated.*",
)


class _DropTorchvisionFallback(logging.Filter):
    """Drop transformers' torchvision-fallback notices (the PIL processors are what we want)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in str(record.msg)


class _DropLitloggerTip(logging.Filter):
    """Drop Lightning's advertisement for its hosted logger (nothing to act on in a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _LITLOGGER_TIP not in str(record.msg)


class _TruncationOnce(logging.Filter):
    """Let the first prompt-truncation warning through in one short line, drop the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(pattern in str(record.msg) for pattern in _TRUNCATED):
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        record.msg = (
            "some prompts are longer than the text encoders take (CLIP: 77 tokens, T5: "
            "model.max_sequence_length) and are truncated; said once"
        )
        record.args = ()
        return True


_installed = False


def install_logging_filters() -> None:
    """The library-log filters, once per process (run at ``import marble_pl``: imports nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    truncation = _TruncationOnce()  # one counter for the tokenizers' and the pipeline's notices
    logging.getLogger("transformers.tokenization_utils_base").addFilter(truncation)
    logging.getLogger(
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"
    ).addFilter(truncation)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLitloggerTip())


def install_notice_filters() -> None:
    """Everything above, plus the expected Lightning warnings (the ``marble`` command only)."""
    install_logging_filters()
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
