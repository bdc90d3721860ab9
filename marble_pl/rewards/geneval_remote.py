"""GenEval scored by a server: the original GenEval (mmdet, open_clip) in its own environment.

The reward POSTs batches of PNG images with their GenEval metadata as JSON and reads one score
per image back. Protocol (one request per batch of at most ``batch_size`` applicable images)::

    POST <url>   Content-Type: application/json
    {"images": ["<base64 PNG>", ...],          # RGB, 8 bits, the images as rendered
     "metadata": [{"tag": ..., "include": [...], "prompt": ..., ...}, ...],
     "only_strict": false}

    200 OK       Content-Type: application/json
    {"scores": [float, ...],                   # GenEval's training reward, one per image
     "strict_accuracy": [0 | 1, ...],          # optional: exact counts, colours, positions
     "accuracy": [0 | 1, ...]}                 # optional: GenEval's accuracy

Which is what DiffusionNFT's ``compute_geneval(images, metadatas, only_strict)`` returns as
``scores``, ``strict_rewards`` and ``rewards``. Connection errors, timeouts, HTTP 429 and 5xx are
retried with exponential backoff; other 4xx and malformed answers are not.
:mod:`marble_pl.rewards.geneval_server` is such a server around DiffusionNFT's GenEval.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from marble_pl.errors import ConfigError, MarbleUserError
from marble_pl.rewards.base import Metadata, Reward
from marble_pl.rewards.geneval_rules import geneval_applicable
from marble_pl.rewards.geneval_server import decode_png
from marble_pl.rewards.registry import register_reward

__all__ = ["GenEvalRemote", "GenEvalServerError", "decode_png", "encode_png"]

log = logging.getLogger(__name__)

_POLICIES = ("error", "not_applicable")


class GenEvalServerError(MarbleUserError, ConnectionError):
    """The GenEval server could not be reached or answered something unusable."""


class _Permanent(Exception):
    """A failure that a retry cannot fix (HTTP 4xx other than 429, a malformed answer)."""


def encode_png(image: Tensor) -> str:
    """Base64 PNG of one ``[3, H, W]`` image in ``[0, 1]`` (rounded to 8 bits)."""
    pixels = (image.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@register_reward("geneval_remote")
class GenEvalRemote(Reward):
    """GenEval's reward from a GenEval server (see the module docstring for the JSON schema).

    Same applicability, scores and logging attributes as ``geneval`` (``last_strict_accuracy``,
    ``last_accuracy``: NaN where not applicable or not returned; ``last_tags``). When the server cannot be
    reached after ``retries`` retries, ``on_failure: error`` stops the run with one line naming
    the URL and the cause; ``on_failure: not_applicable`` logs a warning and scores that batch
    NaN, so its samples leave the reward (``last_failure`` holds the cause, else None).

    Example (YAML)::

        model:
          rewards:
            - {name: geneval_remote, url: "http://localhost:18085/geneval", timeout_s: 120}

    Args:
        url: the server's endpoint (``http://`` or ``https://``).
        batch_size: images per request.
        timeout_s: seconds to wait for one answer.
        retries: further tries after a failed one (0: one try only).
        backoff_s: wait before the first retry, doubled before each next one.
        on_failure: ``error`` or ``not_applicable``.
        only_strict: ask for the strict pass only (``last_accuracy`` stays NaN).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:18085/geneval",
        batch_size: int = 32,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        on_failure: str = "error",
        only_strict: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"reward {self.name!r}: url must start with http:// or https://, got {url!r}"
            )
        if on_failure not in _POLICIES:
            raise ConfigError(
                f"reward {self.name!r}: on_failure must be one of {list(_POLICIES)}, got "
                f"{on_failure!r}"
            )
        for key, value, low in (("batch_size", batch_size, 1), ("retries", retries, 0)):
            if int(value) < low:
                raise ConfigError(f"reward {self.name!r}: {key} must be >= {low}, got {value}")
        if not timeout_s > 0 or not backoff_s >= 0:
            raise ConfigError(
                f"reward {self.name!r}: timeout_s must be > 0 and backoff_s >= 0, got "
                f"{timeout_s} and {backoff_s}"
            )
        self.url = url
        self.batch_size = int(batch_size)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.on_failure = on_failure
        self.only_strict = bool(only_strict)
        self.last_strict_accuracy = torch.empty(0)
        self.last_accuracy = torch.empty(0)
        self.last_failure: str | None = None
        self.last_tags: list[str | None] = []

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """Samples whose metadata carries GenEval's ``include`` clauses."""
        return geneval_applicable(metadata, len(prompts))

    def forward(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """Scores ``[N]`` from the server where applicable, NaN elsewhere."""
        n = images.shape[0]
        out = {key: torch.full((n,), math.nan) for key in ("scores", "strict", "accuracy")}
        self.last_failure = None
        index = torch.nonzero(self.applicable(prompts, metadata)).flatten().tolist()
        for start in range(0, len(index), self.batch_size):
            batch = index[start : start + self.batch_size]
            assert metadata is not None
            payload = {
                "images": [encode_png(images[i]) for i in batch],
                "metadata": [dict(metadata[i]) for i in batch],
                "only_strict": self.only_strict,
            }
            answer = self._post(payload, len(batch))
            if answer is None:
                continue
            for key, field in (("scores", "scores"), ("strict", "strict_accuracy")):
                out[key][batch] = answer[field]
            out["accuracy"][batch] = answer["accuracy"]
        self.last_strict_accuracy, self.last_accuracy = out["strict"], out["accuracy"]
        self.last_tags = [None] * n
        for i in index:
            self.last_tags[i] = str(metadata[i].get("tag"))  # type: ignore[index]
        return out["scores"].to(images.device)

    def _post(self, payload: Mapping[str, Any], n: int) -> dict[str, Tensor] | None:
        """One batch's parsed answer, retried as configured; None when the policy drops it."""
        body = json.dumps(payload).encode()
        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return _parse(self._request(body), n)
            except _Permanent as err:
                cause = str(err)
                break
            except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets
                cause = _describe(err)
        tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
        message = (
            f"reward {self.name!r}: the GenEval server at {self.url} failed after {tries} "
            f"({cause}); start it (README, GenEval) or set on_failure: not_applicable to score "
            "such batches NaN"
        )
        if self.on_failure == "error":
            raise GenEvalServerError(message)
        self.last_failure = cause
        log.warning(
            "reward %r: the GenEval server at %s failed after %s (%s); %d samples score NaN",
            self.name, self.url, tries, cause, n,
        )  # fmt: skip
        return None

    def _request(self, body: bytes) -> bytes:
        """POST ``body``; HTTP 429/5xx raise ``HTTPError`` (retried), other 4xx ``_Permanent``."""
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if err.code == 429 or err.code >= 500:
                raise
            raise _Permanent(f"HTTP {err.code} {err.reason}") from err


def _describe(err: BaseException) -> str:
    """A short cause: ``HTTP 503 ...``, ``timed out after ...``, ``ConnectionRefusedError ...``."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    inner = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(inner, TimeoutError) or "timed out" in str(inner):
        return "timed out"
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _parse(raw: bytes, n: int) -> dict[str, Tensor]:
    """The answer's ``scores`` (required) and accuracies (optional: NaN), each of length n."""
    try:
        answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Permanent(f"the answer is not JSON: {err}") from None
    if not isinstance(answer, Mapping) or "scores" not in answer:
        raise _Permanent('the answer has no "scores" list')
    out: dict[str, Tensor] = {}
    for field in ("scores", "strict_accuracy", "accuracy"):
        values = answer.get(field)
        if values is None and field != "scores":
            out[field] = torch.full((n,), math.nan)
            continue
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise _Permanent(f'"{field}" must be a list of {n} numbers, got {got}')
        try:
            out[field] = torch.tensor([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise _Permanent(f'"{field}" must hold numbers') from None
    return out
