"""The run's config: one nested representation (clipsel_jax.config), defaults written once, the command line on top,
the packaged configs found by name (from a checkout and from a wheel)."""

import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clipsel_jax import config
from clipsel_jax.adapt import AdaptConfig
from clipsel_jax.cli import _parse
from clipsel_jax.scores import DiversityConfig, sample_diversity, score_samples
from clipsel_jax.selection import SelectionConfig

ROOT = Path(__file__).resolve().parent.parent


def test_config_file_and_command_line_overrides(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("def get_config():\n    return dict(data=dict(path='imgs'), encoder=dict(name='enc'), ratio=0.3,\n"
                 "                embed=dict(prompts=['a {}', 'the {}']), adapt=dict(epochs=7),\n"
                 "                scores=dict(k_neighbors=5), selection=dict(alpha=0.5))\n")
    c = _parse(["select", "--config", str(f)]).cfg
    assert (c.data.path, c.ratio, c.embed.prompts, c.adapt.epochs) == ("imgs", 0.3, ("a {}", "the {}"), 7)
    assert (c.scores.k_neighbors, c.selection.alpha, c.workdir) == (5, 0.5, "out/select")
    c = _parse(["select", "--config", str(f), "--ratio", "0.6", "--prompt", "one {}", "--adapter-epochs", "2",
                "--alpha", "paper", "--workdir", "w"]).cfg
    # the command line replaces, never appends to, the config's values
    assert (c.ratio, c.embed.prompts, c.adapt.epochs, c.selection.alpha, c.workdir) == (0.6, ("one {}",), 2,
                                                                                       "paper", "w")
    assert c.scores.k_neighbors == 5  # not given on the command line: the config's
    c = _parse(["embed", "--config", str(f)]).cfg  # one config serves every command; embed has no default workdir
    assert c.data.path == "imgs" and c.workdir is None


def test_defaults_are_the_dataclasses(tmp_path):
    """No option, no config: every setting is its dataclass default (the CLI writes none of its own)."""
    c = _parse(["select"]).cfg
    assert c.adapt.build() == AdaptConfig() and c.selection == SelectionConfig() and c.scores == DiversityConfig()
    assert c.ratio is None and c.seed == 0 and c.method == "clipsel" and c.balance is None
    assert c.embed.prompts == ("A photo of a {}.",)
    # the library's functions default to the same values
    assert score_samples.__kwdefaults__["k_fraction"] == DiversityConfig.k_fraction
    assert sample_diversity.__kwdefaults__["reference_size"] == DiversityConfig.reference_size
    assert config.default("adapt.epochs") == AdaptConfig.epochs and config.default("ratio") is None


def test_method_paper_from_a_packaged_config():
    """The packaged configs leave alignment, alpha and balance to the method: --method paper gives the paper's
    three settings; an explicit option still wins."""
    from clipsel_jax.pipeline import method_settings

    c = _parse(["select", "--config", "cifar10", "--method", "paper"]).cfg
    opts = c.selection_options()
    assert opts["method"] == "paper" and opts["alignment"] is None and opts["balance"] is None
    assert method_settings("paper", opts["alignment"], opts["balance"], opts["selection"])[:2] == ("cosine", "global")
    assert method_settings("paper", None, None, opts["selection"])[2].alpha == "paper"
    c = _parse(["select", "--config", "cifar10", "--method", "paper", "--alignment", "probability",
                "--temperature", "20"]).cfg
    assert (c.scores.alignment, c.scores.temperature) == ("probability", 20.0)
    with pytest.raises(config.ConfigError, match="method must be one of"):
        config.build({"method": "best"})


def test_every_option_maps_to_a_field():
    for option, path in config.OPTIONS.items():
        config.default(path)  # KeyError for a path that names no field
    # and every field of the nested config can be set from the command line
    fields = {f"{s}.{f.name}" for s, cls in config._SECTION_TYPES.items() for f in dataclasses.fields(cls)}
    settable = set(config.OPTIONS.values())
    internal = {f"selection.{n}" for n in ("temperature", "init", "lr", "momentum", "tolerance", "band_margin")}
    assert fields - settable - internal == {"adapt.seed"}  # the run's seed seeds the adapters


@pytest.mark.parametrize("nested, match", [
    (dict(colour="red"), "unknown settings colour"),
    (dict(adapter_epochs=3), r"for adapter_epochs \(write adapt=dict\(epochs=...\)\)"),
    (dict(adapt=dict(epoch=3)), "adapt: unknown settings epoch; the adapt section takes batch_size, epochs"),
    (dict(adapt=[1]), "section adapt must be a dict"),
    (dict(adapt=dict(kind="conv")), "adapt.kind must be 'linear', 'mlp' or 'none'"),
    (dict(adapt=dict(lr=float("nan"))), "lr must be finite, got nan"),
    (dict(adapt=dict(refine=11)), r"refine must be in \[0, 10\], got 11"),
    (dict(scores=dict(k_fraction=0)), "k_fraction must be in"),
    (dict(scores=dict(typicality=-0.5)), "typicality must be >= 0, got -0.5"),
    (dict(scores=dict(typicality=float("nan"))), "typicality must be finite"),
    (dict(selection=dict(alpha="lots")), "alpha must be 'code'"),
    (dict(embed=dict(prompts=["no slot"])), r"must be templates with a \{\}"),
    (dict(encoder=dict(dtype="float16")), "encoder.dtype must be"),
    (dict(ratio=1.5), r"ratio must be in \(0, 1\]"),
    (dict(balance="per class"), "balance must be 'class' or 'global'"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_bad_configs_say_what_is_wrong(nested, match):
    with pytest.raises(config.ConfigError, match=match):
        config.build(nested)


def test_typicality_from_the_command_line_reaches_the_selection_options():
    c = _parse(["select", "--config", "cifar10", "--typicality", "0.3"]).cfg
    assert c.scores.typicality == 0.3 and c.selection_options()["typicality"] == 0.3
    assert _parse(["select", "--config", "cifar10"]).cfg.selection_options()["typicality"] is None  # the method's
    with pytest.raises(SystemExit):
        _parse(["select", "--config", "cifar10", "--typicality", "-1"])


def test_adapter_none_and_selection_options():
    c = config.build(dict(adapt=dict(kind="none"), ratio=0.4, scores=dict(k_neighbors=3)))
    opts = c.selection_options()
    assert opts["adapter"] is None and opts["k_neighbors"] == 3 and opts["selection"] == SelectionConfig()
    assert config.build(c.to_dict()) == c  # to_dict() is a config file's shape


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet", "imagenet1k", "image_folder", "demo"])
def test_packaged_configs_load_by_name_and_by_path(name):
    c = config.load_config(name)
    assert c == config.load_config(str(ROOT / "configs" / f"{name}.py"))
    assert c.data.path and 0 < c.ratio <= 1 and c.workdir.startswith("out/")
    assert config.load_config(name, adapt__epochs=1, ratio=0.5).adapt.epochs == 1
    assert _parse(["select", "--config", name]).cfg == c


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject lists the packages (one is mapped onto configs/): a new subpackage must be added there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "clipsel_jax").rglob("__init__.py")}
    assert folders | {"clipsel_jax.configs"} == listed


@pytest.mark.slow
def test_a_wheel_ships_the_configs(tmp_path):
    """Built and installed as users get it (not from the checkout): `--config cifar10` finds the packaged file."""
    src = tmp_path / "src"  # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in ("clipsel_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel, = tmp_path.glob("clipsel_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"clipsel_jax/configs/cifar10.py", "clipsel_jax/configs/demo.py", "clipsel_jax/config.py",
            "clipsel_jax/demo/cifar10_demo.zip"} <= set(names)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import clipsel_jax, clipsel_jax.config as c; assert 'site' in clipsel_jax.__file__; "
            "print(c.config_file('cifar10'), c.load_config('cifar10').data.path)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "site/clipsel_jax/configs/cifar10.py tfds:cifar10" in r.stdout
