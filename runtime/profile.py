"""Device profiles: what a machine offers the runtime, read from ``profiles/*.yaml``.

A profile says which execution providers to use, how memory is organised (discrete VRAM or one
unified pool), how many bytes of weights each tier may hold, how fast the links between tiers are,
and what an expert costs on each provider. The runtime sizes its caches from it and the balancer
takes its costs from it. ``docs/profiles-and-balancer.md`` documents every field;
``profiles/cpu-only.yaml`` is the commented example.

Budgets come in two forms, each meaning what a user would mean by it:

* bytes (``8589934592``, ``"8GiB"``, ``"512 MiB"``): everything the tier may hold, the trunk
  included when the trunk runs there (the device tier with a GPU, the host tier without one);
* a fraction (``0.17``, ``"17%"``): the share of the package's expert bytes the tier caches,
  on top of the trunk, so ``17%`` is the paper's "17 % of experts cached".

``null`` (or leaving the tier out) means unlimited.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

import spac
from spac.ops.host_cache import POLICIES
from spac.ops.providers import PROVIDERS

from .manifest import excerpt, load_plain_yaml, read_bounded, yaml_problem

MEMORY_MODELS = ("discrete", "unified")
TIERS = ("device", "host")
SOLVERS = ("CBC", "HiGHS", "greedy")
ALIASES = {"jetson-orin": "jetson-orin-agx-64gb"}

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
# Bounds on what a profile may ask for: generous for any real machine, and small enough that a
# stranger's profile cannot make the runtime start 100 000 threads or wait forever.
MAX_PROFILE_BYTES = 2**20  # a profile is a few KB
THREADS_PER_CORE = 4
MIN_THREAD_LIMIT = 16  # so a profile written for an 8-core board still loads on a 2-core laptop
MAX_DRAFT_LEN = 64
# A self-draft from int4 copies of the experts agrees with the target on ~90 % of its tokens
# (the trained model's draft model: 56-60 %), so a longer round pays: at a 25 % host budget
# γ = 8 decoded 1.28x γ = 4 on the trained model and 1.16x on the memory testbed
# (scripts/bench_self_speculative.py --budgets 0.25, README).
SELF_DRAFT_LEN = 8
MAX_BUDGET_BYTES = 2**50  # 1 PiB
MAX_GBPS = 100_000.0  # 100 TB/s, over 10x the fastest HBM today
MAX_MS = 60_000.0  # one minute per expert call or per balancer round

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


class ProfileError(ValueError):
    """A profile that cannot be found, parsed, or used with a package."""


@dataclass(frozen=True)
class ProviderSpec:
    name: str  # "cuda" or "cpu"
    options: dict = field(default_factory=dict)  # passed to ORT as provider options

    @property
    def ort_name(self) -> str:
        return PROVIDERS[self.name]


@dataclass(frozen=True)
class Budget:
    """One tier's budget: ``nbytes`` (trunk included) or ``fraction`` of expert bytes, or neither
    (unlimited)."""

    nbytes: int | None = None
    fraction: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.nbytes is None and self.fraction is None

    def to_yaml(self) -> int | str | None:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return self.nbytes


@dataclass(frozen=True)
class Links:
    storage_to_host_gbps: float  # GB/s (10^9 bytes) reading the package from disk into RAM
    host_to_device_gbps: float | None  # GB/s copying host RAM to the GPU; None without a GPU
    memory_gbps: float | None = None  # DRAM bandwidth; on unified memory CPU and GPU share it


@dataclass(frozen=True)
class ExpertCost:
    """Time of one expert call on one provider:
    ``a_ms + ms_per_mb·MB + b_ms_per_token_per_mb·tokens·MB``.

    ``a_ms`` is the per-call overhead (launch, ORT dispatch), ``ms_per_mb`` streaming the weights
    once (what dominates a decode step), ``b`` the per-token arithmetic."""

    a_ms: float
    b_ms_per_token_per_mb: float
    ms_per_mb: float = 0.0

    def time_ms(self, tokens: float, expert_mb: float) -> float:
        return self.a_ms + expert_mb * (self.ms_per_mb + self.b_ms_per_token_per_mb * tokens)


@dataclass(frozen=True)
class BalancerSettings:
    solver: str = "CBC"  # "CBC", "HiGHS" (python-mip back-ends) or "greedy" (no solver)
    time_limit_ms: float = 20.0  # wall-clock limit of one background solve


@dataclass(frozen=True)
class Profile:
    name: str
    providers: tuple[ProviderSpec, ...]
    memory: str
    budgets: Mapping[str, Budget]
    links: Links
    expert_costs: Mapping[str, ExpertCost]
    threads: int
    draft_len: int
    self_draft_len: int  # γ when the target drafts for itself (its draft agrees far more often)
    policy: str
    estimator: str
    balancer: BalancerSettings
    description: str = ""
    source: str = "<dict>"

    def provider_options(self) -> dict[str, dict]:
        """Each listed provider's ONNX Runtime options, by provider name."""
        return {p.name: dict(p.options) for p in self.providers}

    @property
    def has_gpu(self) -> bool:
        return any(p.name == "cuda" for p in self.providers)

    @property
    def trunk_tier(self) -> str:
        """The tier where the trunk (attention, router, embeddings) lives: it runs on the GPU
        when there is one."""
        return "device" if self.has_gpu else "host"

    def budget_bytes(self, tier: str, total_expert_bytes: int, trunk_bytes: int = 0) -> int | None:
        """Bytes of experts ``tier`` may cache; None means unlimited.

        A byte budget counts the trunk too, so pass ``trunk_bytes`` to have it taken off the tier
        where the trunk lives; a fraction is of ``total_expert_bytes`` and is experts only."""
        if tier not in TIERS:
            raise ProfileError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
        if tier == "device" and not self.has_gpu:
            return 0
        budget = self.budgets.get(tier, Budget())
        if budget.fraction is not None:
            return int(budget.fraction * total_expert_bytes)
        if budget.nbytes is None:
            return None
        trunk = trunk_bytes if tier == self.trunk_tier else 0
        return max(budget.nbytes - trunk, 0)

    def expert_time_ms(self, ep: str, tokens: float, expert_mb: float) -> float:
        """Predicted time of one expert call with ``tokens`` tokens on provider ``ep``."""
        try:
            cost = self.expert_costs[ep]
        except KeyError:
            raise ProfileError(
                f"{self.source}: no expert cost for provider {ep!r}; "
                f"the profile has {', '.join(self.expert_costs)}") from None
        return cost.time_ms(tokens, expert_mb)

    def transfer_ms(self, nbytes: int, link: str = "host_to_device") -> float:
        """Time to move ``nbytes`` over ``link`` ("host_to_device" or "storage_to_host")."""
        gbps = getattr(self.links, f"{link}_gbps")
        if not gbps:
            return math.inf
        return nbytes / (gbps * 1e6)  # GB/s = 10^6 bytes per ms

    def validate_for_package(self, trunk_bytes: int, total_expert_bytes: int) -> None:
        """Raise ProfileError when a byte budget cannot even hold what must live in its tier.

        The trunk must fit where it runs; a fraction cannot fail this check since the trunk
        comes on top of it."""
        for tier in TIERS:
            budget = self.budgets.get(tier, Budget())
            if budget.nbytes is None or tier != self.trunk_tier:
                continue
            if budget.nbytes < trunk_bytes:
                raise ProfileError(
                    f"{self.source}: budgets.{tier} is {format_bytes(budget.nbytes)}, smaller than "
                    f"the package's trunk ({format_bytes(trunk_bytes)}), which must stay in the "
                    f"{tier} tier: the minimum is {trunk_bytes} bytes "
                    f"({format_bytes(trunk_bytes)}); caching every expert as well needs "
                    f"{format_bytes(trunk_bytes + total_expert_bytes)}")

    def to_dict(self) -> dict:
        """The YAML form; ``profile_from_dict(p.to_dict())`` gives ``p`` back."""
        data = {
            "name": self.name,
            "description": self.description,
            "providers": [{"name": p.name, "options": dict(p.options)} for p in self.providers],
            "memory": self.memory,
            "budgets": {tier: b.to_yaml() for tier, b in self.budgets.items()},
            "links": {k: v for k, v in vars(self.links).items() if v is not None},
            "experts": {ep: dict(vars(c)) for ep, c in self.expert_costs.items()},
            "threads": self.threads,
            "draft_len": self.draft_len,
            "self_draft_len": self.self_draft_len,
            "policy": self.policy,
            "estimator": self.estimator,
            "balancer": dict(vars(self.balancer)),
        }
        if not data["description"]:
            del data["description"]
        return data


# ---------------------------------------------------------------------------------------------
# Finding and loading profiles


def profiles_dir() -> Path:
    return Path(spac.__file__).parent / "profiles"


def available_profiles() -> list[str]:
    """Names of the shipped profiles (``profiles/*.yaml``), sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile's name (or alias), or a path to a YAML file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ProfileError(f"profile file {text} does not exist")
        return path
    shipped = profiles_dir() / f"{ALIASES.get(text, text)}.yaml"
    if not shipped.is_file():
        names = available_profiles() + sorted(ALIASES)
        raise ProfileError(f"unknown profile {text!r}; available: {', '.join(names)}")
    return shipped


def max_threads() -> int:
    """The most intra-op threads a profile may ask for on this machine."""
    return max(MIN_THREAD_LIMIT, THREADS_PER_CORE * (os.cpu_count() or 1))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a profile by shipped name (``cpu-only``, ``jetson-orin``, …) or path."""
    path = resolve_profile_path(name_or_path)
    return profile_from_dict(_read_yaml(path), source=str(path), default_name=path.stem)


def _read_yaml(path: Path) -> Any:
    raw = read_bounded(path, MAX_PROFILE_BYTES, ProfileError, str(path), "a profile is a few KB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                           "save the profile as UTF-8") from None
    try:
        return load_plain_yaml(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a scalar its tag cannot hold (2026-13-45)
        raise ProfileError(f"{path}: not valid YAML{yaml_problem(exc)}") from None


def save_profile(profile: Profile, path: str | Path, header: str = "") -> None:
    """Write ``profile`` as YAML atomically (temp file + rename), after checking it reloads."""
    path = Path(path)
    text = header + yaml.safe_dump(profile.to_dict(), sort_keys=False)
    profile_from_dict(yaml.safe_load(text), source=str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Validation: each check raises one ProfileError naming the file, the field and what is valid.

_TOP_KEYS = {"name", "description", "providers", "memory", "budgets", "links", "experts",
             "threads", "draft_len", "self_draft_len", "policy", "estimator", "balancer"}
_REQUIRED = ("providers", "memory", "links", "experts")


class _Reader:
    """Checks values of one profile, so each error message carries the file name."""

    def __init__(self, source: str):
        self.source = source

    def error(self, where: str, problem: str) -> ProfileError:
        return ProfileError(": ".join(part for part in (self.source, where, problem) if part))

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping, got {_kind(value)}")
        unknown = [key for key in value if key not in allowed]
        if unknown:
            key = excerpt(unknown[0] if isinstance(unknown[0], str) else repr(unknown[0]))
            raise self.error(f"{where}.{key}" if where else key,
                             f"unknown key; valid keys are {', '.join(sorted(allowed))}")
        return value

    def number(self, value: Any, where: str, minimum: float = 0.0, maximum: float = math.inf,
               integer: bool = False):
        wanted = "an integer" if integer else "a number"
        ok_type = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            raise self.error(where, f"expected {wanted}, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(where, f"must be a finite number, got {value}")
        if value < minimum:
            raise self.error(where, f"must be ≥ {minimum:g}, got {excerpt(repr(value))}")
        if value > maximum:
            raise self.error(where, f"must be ≤ {maximum:g}, got {excerpt(repr(value))}")
        return value

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(where, f"got {excerpt(repr(value))}; valid values are {', '.join(choices)}")
        return value

    def budget(self, value: Any, where: str) -> Budget:
        if value is None:
            return Budget()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.error(where, f"expected bytes or a fraction, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(where, f"a budget must be a finite number, got {value}")
        if isinstance(value, (int, float)) and value < 0:
            raise self.error(where, f"a budget cannot be negative, got {excerpt(repr(value))}")
        if isinstance(value, int):
            return Budget(nbytes=self._bounded_bytes(value, repr(value), where))
        if isinstance(value, float):
            if value > 1:
                raise self.error(where, f"a fraction must be between 0 and 1, got {value}; "
                                        "write bytes as an integer or a string like '8GiB'")
            return Budget(fraction=value)
        return self._budget_string(value, where)

    def _budget_string(self, value: str, where: str) -> Budget:
        shown = excerpt(repr(value))
        if value.strip().startswith("-"):
            raise self.error(where, f"a budget cannot be negative, got {shown}")
        percent = _PERCENT.match(value)
        if percent:
            fraction = float(percent.group(1)) / 100
            if fraction > 1:
                raise self.error(where, f"a percentage must be at most 100%, got {shown}")
            return Budget(fraction=fraction)
        size = _SIZE.match(value)
        if not size or size.group(2).upper() not in _UNITS:
            raise self.error(where, f"cannot read {shown}; write bytes (8589934592, '8GiB', "
                                    "'512MiB', '2GB') or a fraction of expert bytes (0.17, '17%')")
        nbytes = float(size.group(1)) * _UNITS[size.group(2).upper()]  # inf when absurdly long
        return Budget(nbytes=int(self._bounded_bytes(nbytes, shown, where)))

    def _bounded_bytes(self, nbytes: float, shown: str, where: str) -> float:
        if nbytes > MAX_BUDGET_BYTES:
            raise self.error(where, f"a budget must be ≤ 2^50 bytes (1 PiB), got {excerpt(shown)}")
        return nbytes


def profile_from_dict(data: Any, source: str = "<dict>", default_name: str = "") -> Profile:
    """Build a Profile from its YAML form, raising ProfileError on the first problem."""
    r = _Reader(source)
    data = r.mapping(data, "", _TOP_KEYS)
    for key in _REQUIRED:
        if key not in data:
            raise r.error(key, "missing; every profile needs "
                               + ", ".join(_REQUIRED))
    name = data.get("name", default_name) or default_name
    if not isinstance(name, str) or not name:
        raise r.error("name", f"expected a non-empty string, got {_kind(name)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise r.error("description", f"expected a string, got {_kind(description)}")

    providers = _providers(r, data["providers"])
    has_gpu = any(p.name == "cuda" for p in providers)
    return Profile(
        name=name,
        description=description,
        providers=providers,
        memory=r.choice(data["memory"], "memory", MEMORY_MODELS),
        budgets=_budgets(r, data.get("budgets", {}), has_gpu),
        links=_links(r, data["links"], has_gpu),
        expert_costs=_expert_costs(r, data["experts"], providers),
        threads=r.number(data.get("threads", 1), "threads", minimum=1, maximum=max_threads(), integer=True),
        draft_len=r.number(data.get("draft_len", 4), "draft_len", minimum=1, maximum=MAX_DRAFT_LEN,
                           integer=True),
        self_draft_len=r.number(data.get("self_draft_len", SELF_DRAFT_LEN), "self_draft_len", minimum=1,
                                maximum=MAX_DRAFT_LEN, integer=True),
        policy=r.choice(data.get("policy", "spac"), "policy", POLICIES),
        estimator=_estimator(r, data.get("estimator", "decayed")),
        balancer=_balancer(r, data.get("balancer", {})),
        source=source,
    )


def _providers(r: _Reader, value: Any) -> tuple[ProviderSpec, ...]:
    if not isinstance(value, list) or not value:
        raise r.error("providers", f"expected a non-empty list such as [{{name: cuda}}, "
                                   f"{{name: cpu}}], got {_kind(value)}")
    specs = []
    for i, item in enumerate(value):
        where = f"providers[{i}]"
        item = r.mapping(item, where, {"name", "options"})
        name = r.choice(item.get("name"), f"{where}.name", tuple(PROVIDERS))
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise r.error(f"{where}.options", f"expected a mapping, got {_kind(options)}")
        specs.append(ProviderSpec(name, dict(options)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise r.error("providers", f"each provider may appear once, got {names}")
    if "cpu" not in names:
        # ORT needs the CPU provider for the ops CUDA lacks, and misses run on the CPU.
        raise r.error("providers", "must include cpu (misses run there and ORT needs it)")
    return tuple(specs)


def _budgets(r: _Reader, value: Any, has_gpu: bool) -> dict[str, Budget]:
    value = r.mapping(value if value is not None else {}, "budgets", set(TIERS))
    budgets = {tier: r.budget(value.get(tier), f"budgets.{tier}") for tier in TIERS}
    if not has_gpu and not budgets["device"].unlimited:
        raise r.error("budgets.device", "this profile has no cuda provider, so it has no device "
                                        "tier; remove the field or add {name: cuda} to providers")
    return budgets


def _links(r: _Reader, value: Any, has_gpu: bool) -> Links:
    fields = {"storage_to_host_gbps", "host_to_device_gbps", "memory_gbps"}
    value = r.mapping(value, "links", fields)
    if "storage_to_host_gbps" not in value:
        raise r.error("links.storage_to_host_gbps", "missing; give the disk read bandwidth in GB/s")
    if has_gpu and "host_to_device_gbps" not in value:
        raise r.error("links.host_to_device_gbps", "missing; a profile with cuda needs the "
                                                   "host → device bandwidth in GB/s")

    def rate(key: str) -> float | None:
        if value.get(key) is None:
            return None
        return float(r.number(value[key], f"links.{key}", minimum=1e-9, maximum=MAX_GBPS))

    return Links(rate("storage_to_host_gbps"), rate("host_to_device_gbps"), rate("memory_gbps"))


def _expert_costs(r: _Reader, value: Any, providers: tuple[ProviderSpec, ...]) -> dict:
    names = {p.name for p in providers}
    value = r.mapping(value, "experts", names)
    costs = {}
    for ep in sorted(names):
        where = f"experts.{ep}"
        if ep not in value:
            raise r.error(where, "missing; every listed provider needs its expert cost "
                                 "(a_ms, b_ms_per_token_per_mb, ms_per_mb)")
        coeffs = r.mapping(value[ep], where, {"a_ms", "b_ms_per_token_per_mb", "ms_per_mb"})
        for key in ("a_ms", "b_ms_per_token_per_mb"):
            if key not in coeffs:
                raise r.error(f"{where}.{key}", "missing")
        costs[ep] = ExpertCost(**{k: float(r.number(v, f"{where}.{k}", maximum=MAX_MS)) for k, v in coeffs.items()})
    return costs


def _estimator(r: _Reader, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise r.error("estimator", f"expected an estimator name such as 'spac-counter', "
                                   f"got {_kind(value)}")
    return value


def _balancer(r: _Reader, value: Any) -> BalancerSettings:
    value = r.mapping(value if value is not None else {}, "balancer", {"solver", "time_limit_ms"})
    defaults = BalancerSettings()
    return BalancerSettings(
        solver=r.choice(value.get("solver", defaults.solver), "balancer.solver", SOLVERS),
        time_limit_ms=float(r.number(value.get("time_limit_ms", defaults.time_limit_ms),
                                     "balancer.time_limit_ms", minimum=1e-3, maximum=MAX_MS)),
    )


def parse_budget(value: int | float | str) -> Budget:
    """A budget written as in a profile (9437184, "9MiB", 0.17, "17%"); a ProfileError says what is
    wrong with it, without a file or field name."""
    return _Reader("").budget(value, "")


def parse_bytes(value: int | str) -> int:
    """A byte count written as in a profile: 9437184, "9MiB", "58GB"."""
    budget = parse_budget(value)
    if budget.nbytes is None:
        raise ProfileError(f"{excerpt(repr(value))} is a fraction, not a byte count")
    return budget.nbytes


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {excerpt(repr(value))}"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
