"""The HTTP API's other endpoints, as vLLM serves them: models, tokenize/detokenize, version and
Prometheus metrics. The ingress's routes call these with its service core."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ValidationError

from .. import __version__
from .errors import APIError
from .metrics import render
from .protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from .service import ServiceCore, validation_error


def _model_card(m: dict[str, Any], created: int) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": created, "owned_by": "segserve",
            "root": m["id"], "parent": None, "max_model_len": m["max_model_len"],
            "pools": m["pools"]}  # fmt: skip


def list_models(core: ServiceCore) -> dict[str, Any]:
    created = int(time.time())
    return {"object": "list", "data": [_model_card(m, created) for m in core.list_models()]}


def get_model(core: ServiceCore, model_id: str) -> dict[str, Any]:
    core.served_model(model_id)  # 404 names the models there are
    (m,) = [m for m in core.list_models() if m["id"] == model_id]
    return _model_card(m, int(time.time()))


def _parse(raw: bytes, schema: type) -> Any:
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from e


async def tokenize_off_loop(core: ServiceCore, raw: bytes) -> dict[str, Any]:
    """:func:`tokenize` in the ingress's tokenizer thread, as a completion's prompt is: a chat
    template or a long prompt must not hold the event loop (a 5 MB prompt on it stalled
    /health and every stream for 5 s)."""
    return await core.prepare_off_loop(lambda: tokenize(core, raw), len(raw), chat=True)


def tokenize(core: ServiceCore, raw: bytes) -> dict[str, Any]:
    """vLLM's /tokenize: a prompt, or messages rendered as a chat request would render them."""
    try:
        parsed = json.loads(raw)
        is_chat = isinstance(parsed, dict) and "messages" in parsed
    except (ValueError, RecursionError):
        is_chat = False  # the schema's parse reports the JSON error
    body = _parse(raw, TokenizeChatRequest if is_chat else TokenizeRequest)
    served = core.served_model(body.model)
    if is_chat:
        ids, _ = core.tokenize(served, messages=body.template_messages(),
                               template_kwargs=body.template_kwargs(),
                               add_special_tokens=body.add_special_tokens)  # fmt: skip
    else:
        ids, _ = core.tokenize(served, body.prompt, add_special_tokens=body.add_special_tokens)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": served.max_model_len,
                           "tokens": ids, "token_strs": None}  # fmt: skip
    if body.return_token_strs:
        if served.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "return_token_strs")
        out["token_strs"] = served.tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize(core: ServiceCore, raw: bytes) -> dict[str, Any]:
    body = _parse(raw, DetokenizeRequest)
    served = core.served_model(body.model)
    core.check_token_ids(served, body.tokens, "tokens")
    if served.tokenizer is None:
        raise APIError(400, f"model {body.model!r} has no tokenizer", "model")
    return {"prompt": served.tokenizer.decode(body.tokens)}


def version() -> dict[str, str]:
    return {"version": __version__}


def metrics(core: ServiceCore) -> bytes:
    """Prometheus text of every replica of this application (see metrics.py)."""
    return render(core.router.replica_views())
