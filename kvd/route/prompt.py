"""PromptHasher: a request's prompt as the instances will see it, and its block hashes.

    hasher = PromptHasher(tokenizer)
    ids = hasher.token_ids("/v1/chat/completions", raw_body)   # None: the instance will refuse it
    ids = hasher.generate_ids(generate_msg)                    # a ZeroMQ client's request
    hashes = hasher.hashes(ids, block_size, hash_algo)

The token ids are the ones an instance's frontend computes for the same request: for a
ZeroMQ Generate, `TextStage.request_ids` as `Serving` calls it; for an HTTP body, the same
request Structs (kvd.daemon.openai_api), the same text stage (kvd.engine.text) and, for chat
with tools or tool calls, the same rendering (kvd.daemon.tools). A completion with several
prompts is routed by its first. A request that does not decode or validate gives None: the
router then sends it anywhere and the instance answers its own 400, so there is one truth
for what a valid request is. Hashes are kvd.cache.hashing's, with no extra keys (the
instances' requests carry none).
"""

from __future__ import annotations

import msgspec

from kvd.cache.hashing import hash_blocks
from kvd.daemon import tools
from kvd.daemon.openai_api import ChatRequest, CompletionRequest
from kvd.engine.text import TextStage
from kvd.messages import Generate


class PromptHasher:
    """Tokenizes request bodies with the served model's tokenizer (and chat template)."""

    def __init__(self, tokenizer) -> None:
        self.text = TextStage(tokenizer)
        self._completion = msgspec.json.Decoder(CompletionRequest)
        self._chat = msgspec.json.Decoder(ChatRequest)

    def token_ids(self, path: str, raw: bytes) -> list[int] | None:
        try:
            if path == "/v1/completions":
                return self.text.prompt_ids(self._completion.decode(raw).prompts()[0])
            body = self._chat.decode(raw)
            messages = body.chat()
            if not body.tools and not any("tool_calls" in m or m["role"] == "tool" for m in messages):
                return self.text.chat_ids(messages)
            messages, defs = tools.render(messages, body.tools or [], str(self.text.tokenizer.chat_template))
            return self.text.chat_ids(messages, tools=defs)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return None

    def generate_ids(self, msg: Generate) -> list[int] | None:
        """A ZeroMQ client's Generate, as an instance's frontend tokenizes it."""
        chat = [{"role": m.role, "content": m.content} for m in msg.chat] if msg.chat is not None else None
        try:
            return self.text.request_ids(msg.prompt, msg.prompt_token_ids, chat)
        except ValueError:
            return None

    @staticmethod
    def hashes(token_ids: list[int], block_size: int, hash_algo: str) -> list[bytes]:
        return hash_blocks(token_ids, block_size, algo=hash_algo)
