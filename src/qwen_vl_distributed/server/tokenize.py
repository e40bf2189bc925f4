"""POST /tokenize and /detokenize, in vLLM's request and response shapes.

/tokenize takes a ``prompt`` (tokenized as /v1/completions would) or chat ``messages`` (rendered with the chat
template, tools and chat_template_kwargs, images and videos expanded to their placeholders, exactly as
/v1/chat/completions would): ``{"count", "max_model_len", "tokens", "token_strs"}``.
/detokenize takes ``tokens``: ``{"prompt": text}``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .errors import APIError
from .logprobs import TokenText
from .protocol import DetokenizeRequest, TokenizeRequest


def _check_model(req: Any, state: Any) -> None:
    if req.model is not None and req.model != state.settings.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                            f"{state.settings.model_name!r}", param="model", code="model_not_found")


async def tokenize(req: TokenizeRequest, state: Any) -> dict:
    _check_model(req, state)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "prompt: send either prompt or messages", param="prompt", code="invalid_value")
    # (in the preprocessing pool: a long text takes a while to tokenise, and the event loop serves everyone)
    if req.prompt is not None:
        special = req.add_special_tokens is not False
        ids = (await state.admission.run(None, partial(state.processor.tokenizer, add_special_tokens=special),
                                         req.prompt))["input_ids"]
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        inputs = await state.admission.run(None, state.processor.build_inputs, req.messages, tools,
                                           req.chat_template_kwargs)
        ids = list(inputs.input_ids)
    strs = None
    if req.return_token_strs:
        texts = TokenText(state.processor.tokenizer)
        strs = [texts.text(t) for t in ids]
    return {"count": len(ids), "max_model_len": state.max_len, "tokens": ids, "token_strs": strs}


def detokenize(req: DetokenizeRequest, state: Any) -> dict:
    _check_model(req, state)
    bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"tokens: {bad[0]} is not a token id of this model (0 to {state.vocab_size - 1})",
                       param="tokens", code="invalid_value")
    return {"prompt": state.processor.decode(req.tokens, skip_special_tokens=False)}
