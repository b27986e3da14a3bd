"""A run's settings: one nested config that mirrors the pipeline's stages, each default written once.

    RunConfig
      data       DataConfig       where the images come from (a folder/zip, tfds:NAME, demo)
      encoder    EncoderConfig    which encoder, and how to load it
      embed      EmbedConfig      prompts, batch, decoding workers, a debug limit
      adapt      AdaptConfig      dataset adaptation (clipsel_jax.adapt); kind "none" scores the raw features
      scores     ScoresConfig     the alignment score, SDS's neighbours (clipsel_jax.scores)
      selection  SelectionConfig  the optimiser: alpha, beta, steps, loop (clipsel_jax.selection)
      ratio, method, balance, seed, workdir

Config files (``configs/*.py``, big_vision style) hold ``get_config()`` returning a dict of the same shape, e.g.
``dict(data=dict(path="tfds:cifar10"), adapt=dict(epochs=30), ratio=0.3)``; every key left out keeps its
default. The command line applies its options on top (``--adapter-epochs 2`` sets adapt.epochs): OPTIONS says
which option sets which field. ``--config NAME`` also finds the configs packaged with clipsel_jax
(``clipsel_jax.config.packaged()`` lists them), so they work from a pip install.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from clipsel_jax import checks
from clipsel_jax.adapt import AdaptConfig
from clipsel_jax.pipeline import METHODS
from clipsel_jax.scores import ScoresConfig
from clipsel_jax.selection import SelectionConfig


class ConfigError(ValueError):
    """A config file or a setting that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # folder or .zip of <class>/<file> images (archive.zip:inner/dir), tfds:NAME, or demo
    subdir: str | None = None  # the folder inside `path` holding the class folders; the split for tfds:
    tfds_data_dir: str | None = None
    class_names: str | None = None  # readable names: a JSON list/object or words.txt-style "id name" lines
    max_image_pixels: int | None = None  # None: 89,478,485 (PIL's limit); larger images are recorded unreadable

    def __post_init__(self):
        object.__setattr__(self, "max_image_pixels",
                           checks.optional_number("max_image_pixels", self.max_image_pixels, lo=1, integer=True))


@dataclass(frozen=True)
class EncoderConfig:
    name: str | None = None  # hub id, save_pretrained folder, OpenCLIP/OpenAI file, or "offline" (None: offline)
    tokenizer: str | None = None  # for OpenCLIP/OpenAI files
    activation: str | None = None  # "quick_gelu" | "gelu", for OpenCLIP files without a config
    dtype: str = "float32"  # "float32" | "bfloat16"
    trust_torchscript: bool = False  # TorchScript archives run code when loaded: off unless the file is trusted

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"encoder.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.activation not in (None, "quick_gelu", "gelu"):
            raise ConfigError(f"encoder.activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")


@dataclass(frozen=True)
class EmbedConfig:
    prompts: tuple = ("A photo of a {}.",)  # class prompt templates; several are averaged (an ensemble)
    batch_size: int | None = None  # None: 64 on CPU, 256 otherwise
    workers: int = 0  # image decoding processes (0: threads)
    limit: int | None = None  # only the first N images (in id order): a debug run

    def __post_init__(self):
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if not prompts or not all(isinstance(p, str) and "{}" in p for p in prompts):
            raise ConfigError(f"embed.prompts must be templates with a {{}} for the class name, got {self.prompts!r}")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "batch_size", checks.optional_number("batch_size", self.batch_size, lo=1,
                                                                      integer=True))
        object.__setattr__(self, "workers", checks.number("workers", self.workers, lo=0, integer=True))
        object.__setattr__(self, "limit", checks.optional_number("limit", self.limit, lo=1, integer=True))


NO_ADAPTER = "none"  # adapt.kind "none": score the encoder's own features (an aligned CLIP)


@dataclass(frozen=True)
class AdaptSection:
    """The config's adapt section: AdaptConfig's fields, whose kind may also be "none" (no adapters)."""
    kind: str = AdaptConfig.kind
    loss: str = AdaptConfig.loss
    epochs: int = AdaptConfig.epochs
    lr: float = AdaptConfig.lr
    batch_size: int = AdaptConfig.batch_size
    shared_dim: int | None = AdaptConfig.shared_dim
    seed: int | None = AdaptConfig.seed
    refine: int | None = AdaptConfig.refine  # None: the method's
    refit_epochs: int = AdaptConfig.refit_epochs

    def __post_init__(self):
        if self.kind not in ("linear", "mlp", NO_ADAPTER):
            raise ConfigError(f"adapt.kind must be 'linear', 'mlp' or 'none', got {self.kind!r}")
        self.build()  # checks the numbers now, not after hours of embedding

    def build(self) -> AdaptConfig | None:
        if self.kind == NO_ADAPTER:
            return None
        return AdaptConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdaptConfig)})


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    adapt: AdaptSection = field(default_factory=AdaptSection)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    ratio: float | None = None  # the fraction to keep, in (0, 1]; required to select
    method: str = "clipsel"  # "clipsel" | "paper": presets for alignment, balance and alpha left unset (None)
    balance: str | None = None  # "class": each class keeps round(ratio * n_c); "global": the paper's top-k; None:
    #                             the method's ("class" for clipsel)
    seed: int = 0
    workdir: str | None = None  # None: the command's own default (out/select, out/adapt, ...)

    def __post_init__(self):
        object.__setattr__(self, "ratio", checks.optional_number("ratio", self.ratio, lo=0, hi=1, lo_open=True))
        object.__setattr__(self, "seed", checks.number("seed", self.seed, lo=0, integer=True))
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.balance is not None and self.balance not in ("class", "global"):
            raise ConfigError(f"balance must be 'class' or 'global', got {self.balance!r}")

    def selection_options(self) -> dict:
        """Keyword arguments of pipeline.select_from_embeddings / pipeline.select for these settings."""
        s = self.scores
        return dict(adapter=self.adapt.build(), method=self.method, alignment=s.alignment,
                    temperature=s.temperature, balance=self.balance, k_neighbors=s.k_neighbors,
                    k_fraction=s.k_fraction, reference_threshold=s.reference_threshold,
                    reference_size=s.reference_size, typicality=s.typicality, selection=self.selection)

    def to_dict(self) -> dict:
        """The nested dict of a config file (get_config()'s shape), every field written out."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_TYPES = {"data": DataConfig, "encoder": EncoderConfig, "embed": EmbedConfig, "adapt": AdaptSection,
                  "scores": ScoresConfig, "selection": SelectionConfig}

# Command-line option (argparse dest) -> the field it sets. Options not listed here are not settings of the run
# (--out, --quiet, --wait, ...).
OPTIONS = {
    "data": "data.path", "subdir": "data.subdir", "tfds_data_dir": "data.tfds_data_dir",
    "class_names": "data.class_names", "max_image_pixels": "data.max_image_pixels",
    "encoder": "encoder.name", "tokenizer": "encoder.tokenizer", "activation": "encoder.activation",
    "dtype": "encoder.dtype", "trust_torchscript": "encoder.trust_torchscript",
    "prompt": "embed.prompts", "batch_size": "embed.batch_size", "workers": "embed.workers", "limit": "embed.limit",
    "adapter": "adapt.kind", "adapter_loss": "adapt.loss", "adapter_epochs": "adapt.epochs", "adapter_lr": "adapt.lr",
    "adapter_refine": "adapt.refine", "adapter_refit_epochs": "adapt.refit_epochs",
    "adapter_batch": "adapt.batch_size", "shared_dim": "adapt.shared_dim",
    "alignment": "scores.alignment", "temperature": "scores.temperature", "typicality": "scores.typicality",
    "k_fraction": "scores.k_fraction", "k_neighbors": "scores.k_neighbors",
    "reference_threshold": "scores.reference_threshold", "reference_size": "scores.reference_size",
    "alpha": "selection.alpha", "beta": "selection.beta", "max_steps": "selection.max_steps",
    "loop": "selection.loop",
    "ratio": "ratio", "method": "method", "balance": "balance", "seed": "seed", "workdir": "workdir",
}


def default(path: str):
    """The default of a field, e.g. default("adapt.epochs") -> 30: for help texts."""
    section, _, name = path.rpartition(".")
    cls = _SECTION_TYPES[section] if section else RunConfig
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _build(cls, values: dict, where: str, section: str | None = None):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: {section}: unknown settings {', '.join(unknown)}; the {section} section takes "
                          f"{', '.join(sorted(known))}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {section + ': ' if section else ''}{e}") from None


def build(nested: dict | None = None, overrides: dict | None = None, where: str = "config") -> RunConfig:
    """A RunConfig from a nested dict (a config file's shape) with `overrides` ({"adapt.epochs": 2, ...}) on top.
    Unknown sections or fields are refused, naming what is known; every value is checked."""
    nested = dict(nested or {})
    for path, value in (overrides or {}).items():
        section, _, name = path.rpartition(".")
        if section:
            nested[section] = {**(nested.get(section) or {}), name: value}
        else:
            nested[name] = value
    unknown = sorted(set(nested) - set(SECTIONS))
    if unknown:
        hints = [f"{k} (write {OPTIONS[k].split('.')[0]}=dict({OPTIONS[k].split('.')[1]}=...))"
                 for k in unknown if "." in OPTIONS.get(k, "")]
        raise ConfigError(f"{where}: unknown settings {', '.join(unknown)}; a config has the sections "
                          f"{', '.join(_SECTION_TYPES)} and the settings ratio, method, balance, seed, workdir"
                          + (f"; for {', '.join(hints)}" if hints else ""))
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = nested.pop(name, None) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {name} must be a dict of settings, got {type(values).__name__}")
        sections[name] = _build(cls, values, where, name)
    return _build(RunConfig, {**sections, **nested}, where)


def _packaged_dir():
    """Where the packaged configs are: the package clipsel_jax.configs of an install, or the checkout's configs/
    (clipsel_jax imported from a source tree, which maps no package onto that folder)."""
    try:
        return importlib.resources.files("clipsel_jax.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def packaged() -> list[str]:
    """Names of the configs shipped with clipsel_jax (``--config NAME`` finds them)."""
    return sorted(p.name[:-3] for p in _packaged_dir().iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def config_file(spec: str) -> Path:
    """A config file path, or the name of a packaged config (cifar10, demo, ...)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    name = spec[:-3] if spec.endswith(".py") else spec
    if "/" not in name and name in packaged():
        return Path(str(_packaged_dir() / f"{name}.py"))
    raise ConfigError(f"config {spec!r} does not exist: give a file (get_config() -> dict) or one of the packaged "
                      f"configs: {', '.join(packaged())}")


def read_config_file(spec: str) -> dict:
    """The nested dict a config file's get_config() returns (not yet checked: see build)."""
    path = config_file(spec)
    module_spec = importlib.util.spec_from_file_location(f"clipsel_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config {spec} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {spec} has no get_config() function returning a dict of settings")
    cfg = module.get_config()
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {spec}: get_config() must return a dict, got {type(cfg).__name__}")
    return cfg


def load_config(spec: str, **overrides) -> RunConfig:
    """A config file (or packaged config name) as a RunConfig, with overrides given by field path with dots
    written as double underscores: load_config("cifar10", adapt__epochs=2, ratio=0.5)."""
    return build(read_config_file(spec), {k.replace("__", "."): v for k, v in overrides.items()}, where=spec)
