"""Structured output: grammars that constrain a request's tokens, with xgrammar.

A request's ``SamplingParams.structured`` is one ``{kind: spec}``: a JSON schema (``json``), any
JSON object (``json_object``), a regular expression, a list of choices, or an EBNF (GBNF) grammar
(Lark grammars are tried too). ``Grammars`` compiles it once per distinct spec for the engine's
tokenizer (compiling walks the whole vocabulary; an LRU keeps the results) and every sequence of
the request gets its own ``GrammarMatcher`` (``Sequence.matcher``), advanced by each token it
accepts. Each step the matchers of the constrained rows fill a token bitmask on the host, and
:func:`apply_grammar_bitmask` masks those rows' logits on the device (xgrammar's kernel, rows by
index), so rows without a grammar cost nothing.

xgrammar is imported on first use: a service that never sees a constrained request never loads
it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from .sequence import Sequence
from .vocab_parallel import VocabShard

# xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the rest names the problem.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # a broken install: name the package
        raise ValueError("structured output needs the xgrammar package (pip install "
                         f"xgrammar): {e}") from e
    return xgrammar


def _message(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else repr(e)


def _check_json_schema(schema: Any) -> None:
    """Against the JSON Schema meta-schema (jsonschema comes with Ray), so e.g. a
    ``"minimum": "x"`` is named as such, not as a compiler error."""
    if not isinstance(schema, dict):
        raise ValueError(f"the JSON schema must be an object, not {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:  # xgrammar's own errors still name the problem
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ValueError(f"invalid JSON schema{f' at {where}' if where else ''}: "
                         f"{e.message}") from None


# A JSON schema may nest objects and arrays this deep (JSON levels: an object property is two).
# Compiling grows steeply with depth: 900 levels of nested arrays took xgrammar 39 s here.
MAX_SCHEMA_DEPTH = 64


def json_depth(value: Any, stop_past: int | None = None) -> int:
    """How deep dicts and lists nest in a parsed JSON ``value`` (a scalar is 0), without
    recursing (a raised recursion limit lets ``json.loads`` build values deeper than any
    recursive walk survives). With ``stop_past``, the walk stops once it is deeper than that."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if not isinstance(node, dict | list):
            continue
        deepest = max(deepest, depth)
        if stop_past is not None and depth > stop_past:  # deep enough: skip the rest
            break
        children = node.values() if isinstance(node, dict) else node
        todo.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep() -> ValueError:
    return ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")


def _control_free_strings(schema: Any) -> Any:
    """The schema with every length-bounded string as a pattern. xgrammar (0.2.8) compiles
    ``minLength``/``maxLength`` to a class that admits raw control characters, which no JSON
    parser accepts inside a string; its ``pattern`` strings exclude them."""
    if isinstance(schema, list):
        return [_control_free_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _control_free_strings(v) if k not in ("enum", "const", "default", "examples")
           else v for k, v in schema.items()}  # fmt: skip
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not ({"pattern", "format", "enum", "const"}
                                                       & out.keys()):  # fmt: skip
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^[^\\x00-\\x1f]{{{lo},{hi}}}$"
    return out


def _choice_grammar(choices: list[str]) -> str:
    # JSON string literals are EBNF string literals (same escapes)
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class Grammars:
    """Compiled grammars for one tokenizer, cached by spec."""

    CACHE_SIZE = 256

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # make_request may run on any thread
        self.compiles = 0  # compilations done (not served from the cache)

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return self._compiler

    def compile(self, spec: dict[str, Any]) -> Any:
        """The compiled grammar of ``spec`` (SamplingParams.structured); ValueError naming
        what is wrong with it."""
        # Before anything recurses on it.
        if json_depth(spec.get("json"), MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise _too_deep()
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiled = self._compile(spec)
            self.compiles += 1
            self._cache[key] = compiled
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, spec: dict[str, Any]) -> Any:
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        compiler = self._get_compiler()
        (kind, value), = spec.items()
        try:
            if kind == "json":
                schema = value
                if isinstance(value, str):
                    try:
                        schema = json.loads(value)
                    except ValueError as e:
                        raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
                    except RecursionError:  # nested far too deep for json itself
                        raise _too_deep() from None
                    if json_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
                        raise _too_deep()
                _check_json_schema(schema)
                return compiler.compile_json_schema(json.dumps(_control_free_strings(schema)),
                                                    any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(value))
            if kind == "grammar":
                try:
                    return compiler.compile_grammar(value)
                except RuntimeError as ebnf_error:
                    try:  # vLLM also takes Lark grammars
                        return compiler.compile_lark(value)
                    except Exception:
                        raise ebnf_error from None
        except ValueError:
            raise
        except Exception as e:  # xgrammar's RuntimeErrors: parse errors, unsupported features
            raise ValueError(f"invalid {kind} constraint: {_message(e)}") from None
        raise ValueError(f"unknown structured output kind {kind!r}")

    @staticmethod
    def matcher(compiled: Any) -> Any:
        return _xgr().GrammarMatcher(compiled)


NO_TOKEN_LEFT = ("the request's constraints leave no token to generate next: the structured "
                 "output allows none of the tokens that allowed_token_ids and bad_words permit")


def accept(seq: Sequence, token: int) -> None:
    """Advance the sequence's matcher by its new token. A token the grammar refuses cannot
    have been sampled (its logit was -inf) unless no token was left at all: the grammar and the
    request's other masks (allowed_token_ids, bad words) exclude every one. That is the
    request's own doing, so its error names it (``SequenceGroup.error``), not an internal one."""
    if seq.matcher is not None and not seq.matcher.is_terminated():
        if not seq.matcher.accept_token(token):
            seq.group.error = NO_TOKEN_LEFT
            raise RuntimeError(f"token {token} violates the request's grammar")


_batch_filler: Any = None  # xgrammar's BatchGrammarMatcher: one call fills every row


def grammar_bitmask(seqs: list[Sequence], vocab: int) -> tuple[torch.Tensor | None, list[int]]:
    """The token bitmasks of the rows under a live grammar, filled on the host in one batched
    call (xgrammar's threads, without the GIL), and those rows' indices; ``(None, [])`` when
    no row is constrained."""
    global _batch_filler
    xgr = _xgr()
    rows = [i for i, s in enumerate(seqs)
            if s.matcher is not None and not s.finished and not s.matcher.is_terminated()]
    if not rows:
        return None, []
    bitmask = xgr.allocate_token_bitmask(len(seqs), vocab)
    if _batch_filler is None:
        _batch_filler = xgr.BatchGrammarMatcher()
    _batch_filler.batch_fill_next_token_bitmask([seqs[i].matcher for i in rows], bitmask, rows)
    return bitmask, rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                  vs: VocabShard) -> None:
    """Mask, in place on the device, every token the bitmask forbids in ``rows``; other rows
    are untouched. On a vocabulary shard the bits of this rank's slice are unpacked."""
    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    else:
        bitmask = bitmask.to(logits.device)
    if not vs.sharded:
        _xgr().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1],
                                           indices=rows)
        return
    ids = vs.global_ids(logits.shape[1], logits.device).clamp(max=vs.vocab - 1)
    idx = torch.tensor(rows, device=logits.device)
    words = bitmask[idx][:, ids // 32]
    allowed = ((words >> (ids % 32).to(words.dtype)) & 1).bool()
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


def apply_grammar_bitmask(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """:func:`grammar_bitmask` then :func:`apply_bitmask`, on a whole vocabulary."""
    bitmask, rows = grammar_bitmask(seqs, logits.shape[1])
    if bitmask is not None:
        apply_bitmask(logits, bitmask, rows, VocabShard(logits.shape[1]))
