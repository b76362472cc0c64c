"""The package's tokenizer via the `tokenizers` library (no transformers on the device), with the
model's chat template rendered by jinja2 the way transformers renders it."""

from __future__ import annotations

from tokenizers import Tokenizer

from .manifest import Manifest, ManifestError


class TextTokenizer:
    def __init__(self, manifest: Manifest):
        meta = manifest.tokenizer
        path = manifest.root / "tokenizer" / "tokenizer.json"
        if not path.is_file():
            raise ManifestError(f"package file {path} is missing")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = manifest.target.dims["vocab_size"]
        self.eos_token_ids = frozenset(meta["eos_token_ids"])
        self.chat_template = meta.get("chat_template")
        self.special = {"bos_token": meta.get("bos_token") or "", "eos_token": meta.get("eos_token") or ""}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template: pass the prompt as text or token ids")
        import jinja2

        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        template = environment.from_string(self.chat_template)
        return template.render(**{**template_kwargs, "messages": messages,
                                  "add_generation_prompt": add_generation_prompt, **self.special})

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
