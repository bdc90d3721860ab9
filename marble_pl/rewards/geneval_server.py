"""A GenEval server for ``geneval_remote``: the original GenEval, in its own environment.

Needs only the standard library, numpy and Pillow, so the file runs as a plain script wherever
DiffusionNFT's ``flow_grpo`` (mmdet, open_clip, the Mask2Former checkpoint) is importable::

    python geneval_server.py --port 18085 --device cuda:0

It answers ``POST`` requests with the JSON schema of :mod:`marble_pl.rewards.geneval_remote`
by calling ``flow_grpo.gen_eval.load_geneval(device)``'s scorer. Requests are served one at a
time (the models are not shared between threads). A scorer's ``ValueError`` or ``KeyError``
(bad metadata) answers 400, any other exception 500 (``geneval_remote`` retries those).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["Scorer", "decode_png", "main", "make_server", "upstream_scorer"]

Scorer = Callable[[list[np.ndarray], list[dict[str, Any]], bool], dict[str, list[Any]]]
"""``scorer(images [H, W, 3] uint8, metadata, only_strict) -> {"scores": [...], ...}``."""


def decode_png(data: str) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 RGB array of a base64 PNG."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.array(image.convert("RGB"))


def make_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 18085) -> HTTPServer:
    """An ``HTTPServer`` (not yet serving) that scores each POSTed batch with ``scorer``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            sys.stderr.write(f"geneval_server: {format % args}\n")

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = [decode_png(item) for item in body["images"]]
                metadata = list(body["metadata"])
                if len(images) != len(metadata):
                    raise ValueError(f"{len(images)} images but {len(metadata)} metadata")
            except (ValueError, KeyError, TypeError, OSError) as err:
                self._answer(400, {"error": f"bad request: {type(err).__name__}: {err}"})
                return
            try:
                answer = scorer(images, metadata, bool(body.get("only_strict", False)))
            except (ValueError, KeyError) as err:
                self._answer(400, {"error": f"{type(err).__name__}: {err}"})
                return
            except Exception as err:  # noqa: BLE001 (the client decides whether to retry)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})
                return
            self._answer(200, answer)

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); nothing to tell it

    return HTTPServer((host, port), Handler)


def upstream_scorer(device: str) -> Scorer:
    """DiffusionNFT's GenEval (``flow_grpo.gen_eval.load_geneval``) as a :data:`Scorer`."""
    from flow_grpo.gen_eval import load_geneval  # only in GenEval's environment

    compute = load_geneval(device)

    def scorer(
        images: list[np.ndarray], metadata: list[dict[str, Any]], only_strict: bool
    ) -> dict[str, list[Any]]:
        pil = [Image.fromarray(image) for image in images]
        scores, accuracy, strict, _, _ = compute(pil, metadata, only_strict=only_strict)
        return {
            "scores": [float(s) for s in scores],
            "strict_accuracy": [float(s) for s in strict],
            "accuracy": None if only_strict else [float(a) for a in accuracy],
        }

    return scorer


def main(argv: Sequence[str] | None = None) -> None:
    """Serve GenEval until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18085)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    server = make_server(upstream_scorer(args.device), args.host, args.port)
    print(f"geneval_server: serving on http://{args.host}:{args.port}/", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
