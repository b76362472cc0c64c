"""Multi-turn chat: conversations rendered with the model's chat template, and a session that
keeps the history so each turn reuses the KV cache of the turns before it.

    session = ChatSession(runtime, system="You are terse.")
    print(session.send("Name a prime.").text)
    print(session.send("And another?").text)   # prefills only the new turn
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def chat_prompt(tokenizer, messages: list[dict], system: str | None = None, add_generation_prompt: bool = True,
                template_kwargs: dict | None = None) -> list[int]:
    """The token ids of a conversation; `system` goes first unless the messages have a system turn."""
    messages = list(messages)
    bad = [m for m in messages if not isinstance(m, dict) or m.get("role") not in ROLES]
    if bad:
        raise ValueError(f"each message needs a role among {ROLES}: got {bad[0]!r}")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
    # The template writes any special tokens itself, as transformers' apply_chat_template does.
    return tokenizer.encode(text, add_special_tokens=False)


class ChatSession:
    """A conversation with one Runtime: `send(text)` adds the user turn and the model's reply."""

    def __init__(self, runtime, system: str | None = None, template_kwargs: dict | None = None, **options):
        """`options` are Runtime.stream's generation options (max_new_tokens, temperature...)."""
        self.runtime, self.system, self.template_kwargs, self.options = runtime, system, template_kwargs, options
        self.messages: list[dict] = []
        self.result = None  # the latest turn's GenerationResult

    def stream(self, text: str):
        """Yields the reply's pieces; the reply joins the history once it is complete."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = chat_prompt(self.runtime.tokenizer, self.messages, self.system, True, self.template_kwargs)
            generation = self.runtime.stream(ids, reuse_cache=True, **self.options)
            self.result = generation.result
            yield from generation
        except BaseException:
            self.messages.pop()  # a turn that failed or was interrupted is not part of the conversation
            raise
        self.messages.append({"role": "assistant", "content": self.result.text})

    def send(self, text: str):
        for _ in self.stream(text):
            pass
        return self.result


def interactive(session: ChatSession, write, on_result=None, read=input) -> int:
    """A terminal chat, one line per user turn: '/reset' forgets the conversation, '/exit' or
    end of input ends it. Ctrl-C during a reply drops that turn; at the prompt it ends the chat.
    A turn the model cannot take (the conversation outgrew the context) is reported and dropped."""
    while True:
        try:
            text = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.messages.clear()
            continue
        if not text:
            continue
        pieces = session.stream(text)
        try:
            for piece in pieces:
                write(piece)
            write("\n")
        except KeyboardInterrupt:
            pieces.close()  # the turn leaves the history
            write("\n[interrupted]\n")
        except ValueError as error:  # GenerationError and template errors: this turn only
            write(f"[error] {error} ('/reset' starts a new conversation)\n")
            continue
        if on_result and session.result is not None:
            on_result(session.result)
