"""Model configuration: the `ModelConfig` dataclass, loaded from JSON and validated.

Design choices:
- One flat dataclass whose field names are the keys of `config/model_config.json`, so the JSON a user edits and
  the attributes the model reads are the same words.
- Every key is checked: unknown keys stop with the closest valid key suggested, values are type-checked, and
  each architectural rule names the field that breaks it. `ConfigError` carries that message.
- Where the values came from (`Origin`: the file, and the keys given on the command line) is kept beside the
  settings, not among them, so it never reaches `to_dict`, `==` or a JSON file; each message starts with it.
- `from_hf_dict` / `to_hf_dict` translate to and from a Hugging Face `Gemma3TextConfig` dict, so official
  checkpoints load and trained models export without transformers at run time.
- `load_dataclass` is the generic JSON -> dataclass step, shared with the training config.
"""

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from data.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent  # config paths in JSON files are relative to it
DEFAULT_MODEL_CONFIG = REPO_ROOT / "config" / "model_config.json"
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")  # how sliding layers attend past the window: architecture/attention.py


class ConfigError(UserError, ValueError):
    """A configuration value or file is wrong; the message names the field and the fix."""


@dataclass(frozen=True)
class Origin:
    """Where a config's values came from, for its error messages: `source` names the file (or what the values were
    read from), `command_line` the keys given as --key=value on top of it."""

    source: str
    command_line: frozenset[str] = frozenset()


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:  # JSON writes 1e4 and 10000 alike; an int is a fine float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    return TYPE_NAMES.get(annotation) or getattr(annotation, "__name__", None) or str(annotation)


def load_dataclass(cls: type, values: dict[str, Any], origin: Origin) -> Any:
    """Build config dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type; `origin` says
    where the values came from, for the error messages."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin.source}: expected a JSON object of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{origin.source}: unknown key '{key}'{hint}")
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            where = f"--{key} (command line)" if key in origin.command_line else origin.source
            raise ConfigError(f"{where}: '{key}' must be {_type_name(hints[key])}, got {json.dumps(value)}")
    # an int too large for a float stays an int, for CheckedConfig's range check to name
    converted = {k: float(v) if hints[k] is float and abs(v) < 2**63 else v for k, v in values.items()}
    return cls(**converted, origin=origin)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"key '{duplicates[0]}' appears more than once")
    return dict(pairs)


def file_problem(path: Path, what: str, directory_ok: bool = False) -> str | None:
    """Why `path` cannot be read as a file, as the message that says so ("config file not found: x.json", "prompt
    file /dev/null is not a regular file", "checkpoint a/b cannot exist: a is a file"); `what` names the file's
    role. None when it is a regular file (or, with `directory_ok`, a directory): a failure to read it is then the
    reader's to report."""
    try:
        if path.is_file() or (directory_ok and path.is_dir()):
            return None
        if path.is_dir():
            return f"{what} {path} is a directory"
        if path.exists():  # a device (/dev/null), a socket, a fifo
            return f"{what} {path} is not a regular file"
        blocker = next((p for p in path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return f"{what} {path} cannot exist: {blocker} is a file, not a directory"
        return f"{what} not found: {path}"
    except OSError as e:  # a name too long, a directory that cannot be searched
        return f"cannot read {what} {path} ({e.strerror or type(e).__name__})"


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file, turning a missing file, bad syntax or a failed read into a `ConfigError` that names it."""
    path = Path(path)
    problem = file_problem(path, "config file")
    if problem:
        raise ConfigError(problem)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicates)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # a duplicate key: JSON allows it, but the first value would be silently lost
        raise ConfigError(f"{path}: {e}; keep one") from None
    except RecursionError:  # json's parser recurses once per bracket: thousands of them exhaust Python's stack
        raise ConfigError(f"{path}: brackets nested too deeply to read; a config is an object of settings") from None
    except OSError as e:  # no permission to read it, an I/O error
        raise ConfigError(f"cannot read config file {path} ({e.strerror or type(e).__name__})") from None


@dataclass
class CheckedConfig:
    """Base of the config dataclasses: validated when created, each error prefixed with where the fields it names
    came from. `origin` is a constructor argument kept as `self.origin`, not a field: the settings are the fields."""

    origin: InitVar[Origin | None] = field(default=None, kw_only=True)

    def __post_init__(self, origin: Origin | None) -> None:
        self.origin = origin or Origin(type(self).__name__)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                self._fail(f.name, message=f"'{f.name}' must be a finite number, got {value}")
            # torch, numpy and the checkpoint hold integers in 64 bits; a larger one would overflow or never end
            if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63 for v in numbers):
                self._fail(f.name, message=f"'{f.name}' must be below 2**63 in size, got {value}")
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def where(self, *fields: str) -> str:
        """Where the values of `fields` came from, for a message: the file, the command line, or both when a flag
        conflicts with a value from the file."""
        given = [name for name in fields if name in self.origin.command_line]
        if not given:
            return self.origin.source
        flags = ", ".join(f"--{name}={getattr(self, name)}" for name in given) + " (command line)"
        return flags if len(given) == len(fields) else f"{flags} with {self.origin.source}"

    def _fail(self, *fields: str, message: str) -> NoReturn:
        """Raise ConfigError for a rule that `fields` break, prefixed with where their values came from."""
        raise ConfigError(f"{self.where(*fields)}: {message}")

    def _require_positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                self._fail(
                    name, message=f"'{name}' must {'not be negative' if allow_zero else 'be positive'}, got {value}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready settings (what `load_dataclass` reads back)."""
        return dataclasses.asdict(self)


def machine_memory() -> int:
    """This machine's physical memory in bytes: what a config whose tensors could never fit is measured against."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _default_layer_types() -> list[str]:
    return (["sliding_attention"] * 5 + ["full_attention"]) * 3


@dataclass(frozen=True)
class LayerAttention:
    """What one `layer_types` entry means to the model: which earlier tokens a query sees and its RoPE base."""

    window: int | None  # a query sees itself and the window - 1 tokens before it; None: every earlier token
    rope_base: float


# What each `layer_types` name means, read from the config's fields: the one place that interprets those names
# (besides the Hugging Face translation below). A new attention kind is an entry here.
LAYER_TYPES: dict[str, Callable[["ModelConfig"], LayerAttention]] = {
    "sliding_attention": lambda config: LayerAttention(config.sliding_window, config.rope_local_base),
    "full_attention": lambda config: LayerAttention(None, config.rope_base),
}


@dataclass
class ModelConfig(CheckedConfig):
    """Hyperparameters of a Gemma 3 text model. Defaults are the 270M architecture with GPT-2's vocabulary."""

    vocab_size: int = 50257
    context_length: int = 32768  # longest sequence the model is meant to see (RoPE positions, KV cache)
    emb_dim: int = 640
    n_heads: int = 4
    n_layers: int = 18
    hidden_dim: int = 2048  # feed-forward width
    head_dim: int = 256  # independent of emb_dim / n_heads, as in Gemma 3
    qk_norm: bool = True
    n_kv_groups: int = 1  # number of key/value heads: 1 is multi-query attention
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by this ** -0.5
    rope_local_base: float = 10_000.0  # RoPE base of sliding-window layers
    rope_base: float = 1_000_000.0  # RoPE base of full-attention layers
    sliding_window: int = 512  # a sliding layer's query sees itself and the 511 tokens before it
    layer_types: list[str] = field(default_factory=_default_layer_types)
    dtype: str = "bfloat16"  # dtype for inference and export; training keeps float32 parameters
    tie_embeddings: bool = False  # a separate output head by default; official Gemma 3 ties it to the embedding
    rms_norm_eps: float = 1e-6

    def validate(self) -> None:
        """Check the architectural rules; the first broken one raises `ConfigError` naming its field."""
        self._require_positive(
            "vocab_size",
            "context_length",
            "emb_dim",
            "n_heads",
            "n_layers",
            "hidden_dim",
            "head_dim",
            "n_kv_groups",
            "query_pre_attn_scalar",
            "rope_local_base",
            "rope_base",
            "sliding_window",
            "rms_norm_eps",
        )
        if self.head_dim % 2:
            self._fail("head_dim", message=f"'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_groups:
            self._fail(
                "n_heads",
                "n_kv_groups",
                message=f"'n_heads' ({self.n_heads}) must be divisible by 'n_kv_groups' ({self.n_kv_groups})",
            )
        if self.sliding_window >= self.context_length:
            self._fail(
                "sliding_window",
                "context_length",
                message=(
                    f"'sliding_window' ({self.sliding_window}) must be smaller than 'context_length' "
                    f"({self.context_length})"
                ),
            )
        if len(self.layer_types) != self.n_layers:
            self._fail(
                "layer_types",
                "n_layers",
                message=f"'layer_types' has {len(self.layer_types)} entries but 'n_layers' is {self.n_layers}",
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                self._fail(
                    "layer_types",
                    message=f"'layer_types'[{i}] is '{kind}'; each entry must be one of {', '.join(LAYER_TYPES)}",
                )
        if self.dtype not in DTYPES:
            self._fail("dtype", message=f"'dtype' is '{self.dtype}'; use one of {', '.join(DTYPES)}")
        self._require_fits_in_memory()

    def _require_fits_in_memory(self) -> None:
        """Refuse a model whose weights alone, even in bfloat16 (2 bytes each), exceed this machine's memory: building
        it could only fail, after torch's import, as an out-of-memory error that wrongly suggests a smaller batch."""
        memory = machine_memory()
        needed = 2 * self.parameter_count
        if needed > memory:
            embedding = self.vocab_size * self.emb_dim * (1 if self.tie_embeddings else 2)
            fields = ("vocab_size", "emb_dim") if 2 * embedding > self.parameter_count else ("n_layers", "hidden_dim")
            sizes = ", ".join(f"'{name}' {getattr(self, name):,}" for name in fields)
            self._fail(
                *fields,
                message=f"{sizes} make a model of {self.parameter_count:,} parameters, whose weights alone need "
                f"{needed / 2**30:,.0f} GiB even in bfloat16; this machine has {memory / 2**30:,.0f} GiB of memory",
            )

    @property
    def parameter_count(self) -> int:
        """The model's parameters, counted from the config (Gemma3Model's layers, without building it)."""
        embeddings = self.vocab_size * self.emb_dim * (1 if self.tie_embeddings else 2)
        attention = self.emb_dim * self.head_dim * 2 * (self.n_heads + self.n_kv_groups)
        norms = 4 * self.emb_dim + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * self.emb_dim * self.hidden_dim
        return embeddings + self.n_layers * (attention + norms + mlp) + self.emb_dim

    @property
    def layer_attention(self) -> list[LayerAttention]:
        """Each layer's attention, resolved from its `layer_types` entry (LAYER_TYPES): the model, the KV cache, the
        FLOP count and the exports read this, never the names."""
        return [LAYER_TYPES[kind](self) for kind in self.layer_types]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> "ModelConfig":
        return load_dataclass(cls, values, Origin(source))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Translate a Hugging Face Gemma 3 text `config.json` dict.

        Accepts both the transformers 4 spelling (`rope_theta`, `rope_local_base_freq`, `torch_dtype`) and the
        transformers 5 one (`rope_parameters` per layer type, `dtype`). Features this model does not implement
        (logit soft-capping, RoPE scaling, bidirectional attention, biases) stop with a message, not silently.
        """
        source = "Hugging Face config.json"
        if hf.get("model_type") == "gemma3" or "text_config" in hf:
            raise ConfigError(
                f"{source}: this is a multimodal Gemma 3 checkpoint (model_type 'gemma3'); "
                "only text checkpoints (model_type 'gemma3_text', e.g. google/gemma-3-270m) are supported"
            )
        unsupported = {
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
            "attention_bias": False,
            "rope_scaling": None,
        }
        for key, expected in unsupported.items():
            if hf.get(key, expected) not in (expected, None):
                raise ConfigError(f"{source}: '{key}' = {hf[key]!r} is not supported by this implementation")
        if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(
                f"{source}: 'hidden_activation' must be gelu_pytorch_tanh, got {hf['hidden_activation']!r}"
            )

        rope = hf.get("rope_parameters") or {}
        for kind, params in rope.items():
            if params and params.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: RoPE type {params['rope_type']!r} for {kind} is not supported")
        rope_base = (rope.get("full_attention") or {}).get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        rope_local_base = (rope.get("sliding_attention") or {}).get(
            "rope_theta", hf.get("rope_local_base_freq", 10_000.0)
        )
        n_layers = hf["num_hidden_layers"]
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        ]
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        return cls(
            vocab_size=hf["vocab_size"],
            context_length=hf["max_position_embeddings"],
            emb_dim=hf["hidden_size"],
            n_heads=hf["num_attention_heads"],
            n_layers=n_layers,
            hidden_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim", 256),
            qk_norm=True,
            n_kv_groups=hf["num_key_value_heads"],
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            rope_local_base=float(rope_local_base),
            rope_base=float(rope_base),
            sliding_window=hf["sliding_window"],
            layer_types=list(layer_types),
            dtype=dtype if dtype in DTYPES else "bfloat16",
            tie_embeddings=hf.get("tie_word_embeddings", True),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            origin=Origin(source),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face `Gemma3TextConfig` dict (transformers 5 spelling)."""
        if not self.qk_norm:
            raise ConfigError(f"{self.origin.source}: a model without qk_norm has no Hugging Face Gemma 3 equivalent")
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.context_length,
            "hidden_size": self.emb_dim,
            "num_attention_heads": self.n_heads,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "head_dim": self.head_dim,
            "num_key_value_heads": self.n_kv_groups,
            # transformers types this field as int (256 for every released Gemma 3)
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar)
            if float(self.query_pre_attn_scalar).is_integer()
            else self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": self.rope_base},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base},
            },
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "dtype": self.dtype,
        }
