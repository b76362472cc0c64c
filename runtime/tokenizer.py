"""The package's tokenizer via the `tokenizers` library (no transformers on the device), with the
model's chat template rendered in a sandbox the way transformers renders it (chat_template.py)."""

from __future__ import annotations

from functools import cached_property

from tokenizers import Tokenizer

from .chat_template import ChatTemplate
from .manifest import MANIFEST, TOKENIZER_JSON, Manifest, ManifestError, read_verified


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    """tokenizer.json parsed from the very bytes that passed its sha256 check."""
    data = read_verified(manifest, TOKENIZER_JSON)
    try:
        return Tokenizer.from_str(data.decode())
    except Exception as error:  # tokenizers raises plain Exception for bad JSON or a bad model
        raise ManifestError(f"package file {manifest.root / TOKENIZER_JSON} is not a valid tokenizers "
                            f"tokenizer.json: {' '.join(str(error).split())[:200]}") from None


class TextTokenizer:
    def __init__(self, manifest: Manifest):
        meta = manifest.tokenizer
        self.manifest = manifest
        self.tokenizer = load_tokenizer(manifest)
        self.vocab_size = manifest.target.dims["vocab_size"]
        self.eos_token_ids = frozenset(meta["eos_token_ids"])
        self.chat_template = meta.get("chat_template")
        self.special = {"bos_token": meta.get("bos_token") or "", "eos_token": meta.get("eos_token") or ""}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @cached_property
    def _template(self) -> ChatTemplate:
        # Compiled on first use: a package whose template does not compile still runs text prompts.
        return ChatTemplate(self.chat_template, f"{self.manifest.root / MANIFEST}: tokenizer.chat_template")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The prompt text for chat messages; `template_kwargs` reach the template (enable_thinking,
        tools, ...) and override the special tokens. Raises ChatTemplateError (a ValueError)."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template: pass the prompt as text or token ids")
        return self._template.render(messages, add_generation_prompt, **{**self.special, **template_kwargs})

    def encode_prompt(self, prompt) -> list[int]:
        """A prompt as text, as token ids, or as chat messages ([{"role": ..., "content": ...}])."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        items = list(prompt)
        if items and all(isinstance(item, dict) for item in items):
            # The template writes any special tokens itself, as transformers' apply_chat_template does.
            return self.encode(self.render_chat(items), add_special_tokens=False)
        if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            bad = [item for item in items if not 0 <= item < self.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
            return items
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages "
                        "({'role': ..., 'content': ...})")
