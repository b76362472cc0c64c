"""What one generation did and cost, as one typed record (`GenerationResult.stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spac.ops.stats import DraftExpertStats, ExpertStats

from .speculative import DecodeStats


@dataclass
class GenerationStats:
    """One generation: its tokens and seconds, the decoder's rounds (`decode`) and what the
    expert stack did (`experts`); two generations' stats sum with `+`."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decoded_tokens: int = 0  # the new tokens after the first, which the prefill pass gives
    decode: DecodeStats = field(default_factory=DecodeStats)
    draft_len: int = 0
    experts: ExpertStats = field(default_factory=ExpertStats)
    policy: str = "resident"
    provider: str = "cpu"
    draft: str = "none"  # what drafted: "model", "self" (the target's held experts) or "none"
    draft_experts: DraftExpertStats = field(default_factory=DraftExpertStats)  # a self-draft's substitutions

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the prefill's token is not counted."""
        if self.decode_seconds > 0 and self.decoded_tokens > 0:
            return self.decoded_tokens / self.decode_seconds
        return 0.0

    def __add__(self, other: "GenerationStats") -> "GenerationStats":
        """Two generations' totals (rates recomputed from the sums); draft_len, policy,
        provider and draft are this one's."""
        return GenerationStats(
            self.prompt_tokens + other.prompt_tokens, self.new_tokens + other.new_tokens,
            self.prefill_seconds + other.prefill_seconds, self.decode_seconds + other.decode_seconds,
            self.decoded_tokens + other.decoded_tokens, self.decode + other.decode, self.draft_len,
            self.experts + other.experts, self.policy, self.provider, self.draft,
            self.draft_experts + other.draft_experts)

    def as_dict(self) -> dict:
        """The flat mapping of `spac-run --json` and the stats line."""
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            **self.decode.as_dict(),
            "draft_len": self.draft_len,
            "draft": self.draft,
            "draft_substitution_rate": self.draft_experts.substitution_rate,
            "expert_calls": dict(self.experts.calls),
            **self.experts.paging_dict(),
            "policy": self.policy,
            "provider": self.provider,
        }
