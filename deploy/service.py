"""The service core: protocol-independent request handling for the HTTP routes and gRPC methods.

Both protocols become the same ``Prepared`` request (validated sampling, token ids, the pool
that serves it) and read the same replica stream; only the rendering differs. The first stream
item is awaited before any response starts, so an error the replica finds (pool too small, its
queue full) still becomes a proper status code rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..actors.sampling_params import SamplingParams
from ..models.loader import load_spec, load_tokenizer, resolve_model_path
from .config import ModelConfig, ServiceConfig
from .errors import APIError, engine_error_param
from .launch import serve_uses_grpc
from .protocol import CACHE_SALT_MAX_CHARS
from .responses import ChoiceState
from .router import PoolRouter, PoolState
from .streams import MergedStream, ReplicaGone, open_streams
from .tool_parsers import PARSERS, ForcedCallParser, ToolParser, detect_tool_parser

logger = logging.getLogger(__name__)
T = TypeVar("T")


# A request with more prompt text than this is prepared (tokenized, its chat template applied)
# in the ingress's tokenizer thread, not on its event loop, which meanwhile serves the other
# requests' streams: 20k characters take ~13 ms to encode (SmolLM2's tokenizer, this 2-core
# box), and the Rust tokenizer releases the GIL while it works. Token ids and short text stay
# on the loop, which saves them the thread hop.
OFF_LOOP_TEXT_CHARS = 1000

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _json_path(loc: tuple) -> str:
    """A pydantic error location as the request's JSON path: a union's branch tags
    ("str", "list[str]", "TextPart") are pydantic's, not the client's."""
    return ".".join(
        str(p) for p in loc
        if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS or p[:1].isupper()))
    )  # fmt: skip


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """A problem named by its JSON path (what OpenAI's `param` means): of a value that fits
    none of a union's types, the most specific branch's (``stop.0`` rather than ``stop``)."""
    errors = e.errors()
    err = max(errors, key=lambda x: len(_json_path(x["loc"]).split(".")))
    if any(x["type"] == "json_invalid" for x in errors):
        err = next(x for x in errors if x["type"] == "json_invalid")
    loc = _json_path(err["loc"])
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {err['msg']}")
    if err["type"] == "missing":
        return APIError(400, f"missing required field {loc!r}", loc)
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {loc!r}", loc)
    return APIError(400, f"invalid value for {loc!r}: {err['msg']}", loc or None)


@dataclass
class Prepared:
    """A validated request, ready for a replica."""

    model: ModelConfig
    prompt_ids: list[int]
    sampling: dict[str, Any]
    pool: PoolState
    request_id: str
    cached_tokens: int = 0  # prompt tokens the replica found in its prefix cache (at the end)
    prompt_text: str | None = None  # the text prompt as sent (not truncated), for echo
    tool_parser: ToolParserFactory | None = None  # set when the reply's tool calls are parsed
    deadline: float | None = None  # time.monotonic() by which it must end (request_timeout_s)


@dataclass
class ServedModel:
    config: ModelConfig
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    tool_parser: type[ToolParser] | None = None
    # Text longer than this cannot fit max_model_len tokens (None: no tokenizer). Checked
    # before tokenizing: a 10 MB prompt otherwise held the one tokenizer thread for seconds
    # (every other request's prompt waits behind it) and the ingress's memory grew by GBs.
    max_prompt_chars: int | None = None

    @classmethod
    def load(cls, config: ModelConfig) -> ServedModel:
        path = resolve_model_path(config.path)
        spec, tok = load_spec(path), load_tokenizer(path)
        parser = config.tool_parser
        if parser == "auto":
            parser = detect_tool_parser(getattr(tok, "chat_template", None)) or "none"
        max_len = config.max_model_len or spec.max_position_embeddings
        return cls(config, tok, max_len, spec.vocab_size, PARSERS.get(parser),
                   None if tok is None else max_len * longest_token_chars(tok) * 4)  # fmt: skip

    def special_texts(self, keep: tuple[str, ...]) -> tuple[str, ...]:
        """The text of every special token but ``keep``: what a reply decoded with special
        tokens (for a parser's markers) must not show."""
        tok = self.tokenizer
        if tok is None:
            return ()
        texts = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        return tuple(sorted(texts - set(keep), key=len, reverse=True))


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: its vocabulary's longest entry
    (a byte-level BPE entry has a character per byte; a byte-fallback entry like "<0x0A>"
    overstates, which only loosens the bound). So a text of c characters needs at least
    c / this many tokens, give or take a normalizer that drops characters (hence the x4 slack
    where it is used)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


@dataclass(frozen=True)
class ToolParserFactory:
    """Makes one parser per choice, and cleans the text it is fed."""

    parser: Callable[[], ToolParser]
    strip: tuple[str, ...] = ()  # special tokens' texts to remove (see ServedModel)

    def __call__(self) -> ToolParser:
        return self.parser()

    def clean(self, text: str) -> str:
        for t in self.strip:
            text = text.replace(t, "")
        return text


class ServiceCore:
    """Protocol-independent request handling shared by the HTTP routes and gRPC methods."""

    def __init__(self, config: ServiceConfig, handles: dict[str, Any], app_name: str) -> None:
        self.config = config
        # .options() initializes a handle: its request router then follows the replicas from
        # the start, so /metrics and the pool spill check see them before the first request.
        # The transport is chosen here, in the replica, from the cluster's serve mode: a
        # handle keeps the options of the process that made it (the driver, which may have
        # imported Serve before its mode was set, or run in another shell).
        transport = {"_by_reference": not serve_uses_grpc()}
        self.handles = {name: h.options(stream=True, **transport) for name, h in handles.items()}
        self.router = PoolRouter(config, app_name)
        self.models: dict[str, ServedModel] = {}
        for m in config.models:
            self.models[m.name] = ServedModel.load(m)
        key = config.ingress.api_key
        if config.ingress.api_key_env:
            key = os.environ.get(config.ingress.api_key_env)
            if not key:
                raise ValueError(
                    f"ingress.api_key_env names {config.ingress.api_key_env}, which is not set"
                )
        self.api_key = key
        # One thread: a tokenizer must not encode in two threads at once (tokenizers raises
        # "Already borrowed").
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="segserve-tokenizer")

    async def prepare_off_loop(self, prepare: Callable[[], T], text_chars: int,
                               chat: bool = False) -> T:  # fmt: skip
        """``prepare()`` (which calls :meth:`prepare` per prompt, or :meth:`tokenize`), in the
        tokenizer thread when the request has ``text_chars`` >= OFF_LOOP_TEXT_CHARS of text to
        tokenize, or is a ``chat`` (a chat template to render: Jinja, always off the loop)."""
        if text_chars < OFF_LOOP_TEXT_CHARS and not chat:
            return prepare()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, prepare)

    # ----- checks ---------------------------------------------------------------------------
    def authorize(self, authorization: str | None) -> str | None:
        """Check the API key; return the prefix-cache salt it implies (None: none)."""
        if self.api_key is None:
            return None
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return self.config.ingress.api_key_cache_salt

    @staticmethod
    def cache_salt(requested: str | None, key_salt: str | None) -> str | None:
        """The salt a request's prefix-cache keys are seeded with. Under a key's salt the
        request's own one only subdivides it, so no request can name its way into another
        key's cache; without one the key space is ``r:`` + the request's salt."""
        if requested is not None and len(requested) > CACHE_SALT_MAX_CHARS:
            raise APIError(400, f"cache_salt must be at most {CACHE_SALT_MAX_CHARS} characters",
                           "cache_salt")  # fmt: skip
        if key_salt is None:
            return None if requested is None else "r:" + requested
        return "k:" + key_salt + ("" if requested is None else "/" + requested)

    def served_model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"model {name!r} does not exist; models: {sorted(self.models)}",
                           "model")  # fmt: skip
        return served

    def prepare(
        self,
        model: str,
        sampling: dict[str, Any],
        *,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool | None = None,
        truncate_prompt_tokens: int | None = None,
        parse_tool_calls: bool = False,
        forced_tool: str | None = None,
        device: str = "auto",
    ) -> Prepared:
        """Validate and tokenize one prompt (text, token ids, or messages through the chat
        template with ``template_kwargs``) and pick its pool. ``parse_tool_calls``: the reply's
        tool calls are read with the model's tool parser; ``forced_tool`` ("*" or a function
        name: the reply is constrained to calls) with a JSON reader instead."""
        served = self.served_model(model)
        tool_parser = None
        if forced_tool is not None:
            tool_parser = ToolParserFactory(
                ForcedCallParser.factory(None if forced_tool == "*" else forced_tool))
        elif parse_tool_calls:
            if served.tool_parser is None:
                raise APIError(400, f"model {model!r} has no tool-call parser: its chat template "
                               "names no known tool-call format; set tool_parser in its "
                               "config", "tools")  # fmt: skip
            markers = served.tool_parser.markers
            tool_parser = ToolParserFactory(served.tool_parser,
                                            served.special_texts(markers) if markers else ())
            if markers:  # the parser reads special tokens: decode them
                sampling = {**sampling, "skip_special_tokens": False}
        prompt_ids, prompt_text = self.tokenize(served, prompt, messages, template_kwargs,
                                                add_special_tokens,
                                                truncating=truncate_prompt_tokens is not None)
        input_param = "messages" if messages is not None else "prompt"
        if truncate_prompt_tokens is not None:
            keep = served.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if keep == 0 or keep > served.max_model_len:
                raise APIError(400, f"truncate_prompt_tokens must be -1 or in [1, "
                               f"{served.max_model_len}]", "truncate_prompt_tokens")  # fmt: skip
            if len(prompt_ids) > keep:  # vLLM keeps the end: the part nearest the reply
                prompt_ids, prompt_text = prompt_ids[-keep:], None
        if not prompt_ids:
            raise APIError(400, "prompt is empty", input_param)
        if messages is not None and "max_tokens" not in sampling:
            # OpenAI's chat default: up to the context length
            room = served.max_model_len - len(prompt_ids)
            sampling = {**sampling, "max_tokens": max(1, room)}
        try:
            params = SamplingParams(**sampling)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), engine_error_param(str(e))) from e
        total = len(prompt_ids) + params.max_tokens
        if total > served.max_model_len:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's maximum context length {served.max_model_len}",
                input_param if len(prompt_ids) >= served.max_model_len else "max_tokens",
            )
        pool = self.router.choose(served.config, device)
        timeout = self.config.ingress.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        return Prepared(served.config, prompt_ids, sampling, pool, uuid.uuid4().hex,
                        prompt_text=prompt_text, tool_parser=tool_parser,
                        deadline=deadline)  # fmt: skip

    def tokenize(
        self, served: ServedModel, prompt: str | list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool | None = None,
        truncating: bool = False,
    ) -> tuple[list[int], str | None]:  # fmt: skip
        """A prompt's token ids (and its text, when it is text). Special tokens: added to text
        by default, not to chat (the template holds those it wants). Text too long for the
        context is refused untokenized, unless ``truncating`` (truncate_prompt_tokens): then
        only its end is tokenized, as only the end is kept."""
        if messages is not None:
            kwargs = {"add_generation_prompt": True, **(template_kwargs or {})}
            if "chat_template" in kwargs and not self.config.ingress.trust_request_chat_template:
                raise APIError(400, "this service does not render chat templates sent with "
                               "requests (a template is code; its config's "
                               "ingress.trust_request_chat_template allows it)", "chat_template")
            text = self._render_chat(served, messages, kwargs)
            text = self._fit(served, text, truncating, "messages", "the rendered chat")
            # The template already holds the special tokens (BOS) it wants.
            return list(served.tokenizer(text, add_special_tokens=bool(add_special_tokens))
                        .input_ids), None  # fmt: skip
        tok = served.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise APIError(400, f"model {served.config.name!r} has no tokenizer; send token "
                               "ids", "prompt")  # fmt: skip
            add = True if add_special_tokens is None else add_special_tokens
            text = self._fit(served, prompt, truncating, "prompt", "the prompt")
            return list(tok(text, add_special_tokens=add).input_ids), text
        ids = list(prompt or [])
        self.check_token_ids(served, ids, "prompt")
        return ids, None

    @staticmethod
    def check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                           f"[0, {served.vocab_size})", param)  # fmt: skip

    @staticmethod
    def _fit(served: ServedModel, text: str, truncating: bool, param: str, what: str) -> str:
        """``text``, or its end when it is longer than any context's worth of tokens and the
        request truncates (the tail still holds 4x more tokens than can be kept); too long
        and not truncating: a 400, before any tokenizing."""
        limit = served.max_prompt_chars
        if limit is None or len(text) <= limit:
            return text
        if truncating:
            return text[-limit:]
        raise APIError(400, f"{what} is {len(text)} characters: far more than the model's "
                       f"maximum context length of {served.max_model_len} tokens holds (at most "
                       f"{limit} characters; or set truncate_prompt_tokens)", param)

    @staticmethod
    def _render_chat(
        served: ServedModel, messages: list[dict[str, Any]], template_kwargs: dict[str, Any],
    ) -> str:  # fmt: skip
        tok = served.tokenizer
        if not messages:
            raise APIError(400, "messages must not be empty", "messages")
        if tok is None or not (getattr(tok, "chat_template", None)
                               or template_kwargs.get("chat_template")):  # fmt: skip
            raise APIError(400, f"model {served.config.name!r} has no chat template; use "
                           "/v1/completions", "messages")  # fmt: skip
        try:
            text = tok.apply_chat_template(messages, tokenize=False, **template_kwargs)
        except Exception as e:  # a template may raise on roles or fields it does not know
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           "messages") from e  # fmt: skip
        return text

    # ----- the replica streams --------------------------------------------------------------
    async def open_streams(self, preps: list[Prepared]) -> MergedStream:
        """Start every prompt's request and wait for each one's first item (see streams.py).
        The caller must ``close()`` the result when done with it."""
        limit = min((p.pool.pool.max_queue_len for p in preps), default=0)
        if len(preps) > limit:
            # More prompts than a replica's queue holds would always come back 429, which
            # tells the client to retry what can never fit.
            raise APIError(400, f"a request may hold at most {limit} prompts (the pool's "
                           f"max_queue_len); this one holds {len(preps)}", "prompt")
        return await open_streams(self.handles, preps)

    def logprob_entries(self, model: str, wire: list[tuple],
                        as_token_ids: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """The replica's (id, logprob, top) tuples as entries naming each token; with
        ``as_token_ids`` (vLLM's return_tokens_as_token_ids) a token is "token_id:<id>"."""
        tok = self.models[model].tokenizer

        def text(t: int) -> str:
            if as_token_ids:
                return f"token_id:{t}"
            return tok.decode([t]) if tok is not None else str(t)

        return [
            {"token_id": tid, "token": text(tid), "logprob": lp,
             "top": [{"token_id": t, "token": text(t), "logprob": v} for t, v in top]}
            for tid, lp, top in wire
        ]  # fmt: skip

    def decode(self, model: str, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        tok = self.models[model].tokenizer
        if tok is None:
            return ""
        return tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    async def feed_all(
        self, preps: list[Prepared], stream: MergedStream,
        feed: Callable[[int, dict[str, Any]], None], restart: Callable[[], None],
    ) -> None:  # fmt: skip
        """Every item of ``stream`` (of ``preps``) into ``feed``, for a reply sent whole at the
        end. The client has seen nothing yet, so if a replica dies mid-way the request starts
        again, once, on another replica (``restart`` first forgets what was fed)."""
        for attempt in (0, 1):
            try:
                async for pos, item in stream:
                    feed(pos, item)
                return
            except ReplicaGone:
                if attempt:
                    raise
                logger.warning("request %s: its replica went away mid-way; starting it again",
                               preps[0].request_id)  # fmt: skip
                restart()
            finally:
                stream.close()
            stream = await self.open_streams(preps)

    async def collect(self, preps: list[Prepared]) -> list[list[ChoiceState]]:
        """Every choice of every prompt, whole, once the streams have ended."""
        choices: list[dict[int, ChoiceState]] = [{} for _ in preps]

        def feed(pos: int, item: dict[str, Any]) -> None:
            c = choices[pos].setdefault(item["index"], ChoiceState(item["index"]))
            wire = item.get("logprobs") or []
            c.add(item, self.logprob_entries(preps[pos].model.name, wire))
            if "prompt_logprobs" in item and c.prompt_logprobs is None:
                c.prompt_logprobs = self.logprob_entries(preps[pos].model.name,
                                                         item["prompt_logprobs"])

        def restart() -> None:
            for cs in choices:
                cs.clear()

        await self.feed_all(preps, await self.open_streams(preps), feed, restart)
        return [[cs[i] for i in sorted(cs)] for cs in choices]

    def list_models(self) -> list[dict[str, Any]]:
        return [
            {"id": name, "pools": [s.pool.name for s in self.router.pools[name]],
             "max_model_len": m.max_model_len}
            for name, m in self.models.items()
        ]  # fmt: skip
