"""Building a run's config: schema defaults ← YAML preset(s) ← ``key=value`` overrides.

A preset may list other presets to merge first under ``defaults:`` (paths relative to the
preset), so ``configs/experiment/*.yaml`` compose dataset/model/method presets.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ltdist.config.schema import Config


class ConfigError(ValueError):
    """A config problem, reported before anything starts; the message names each bad key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        full = f"{prefix}{key}"
        keys.append(full)
        value = node._get_node(key)
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) is not dict:
            keys += _all_keys(value, f"{full}.")
    return keys


def closest_key(key: str) -> str | None:
    """The schema key most similar to ``key`` (for 'did you mean' messages), or None."""
    candidates = _all_keys(OmegaConf.structured(Config))
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not match:  # a typo in the last component only: compare leaf names within the section
        leaf = key.rsplit(".", 1)[-1]
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf_match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        match = [leaves[leaf_match[0]]] if leaf_match else []
    return match[0] if match else None


# Keys that were renamed: old key → (new key, why), so an old preset or command line is told what to write.
RENAMED = {
    "launch.max_requeues": ("launch.max_timeouts", "submitit counts time-outs only; preemptions are requeued "
                            "without limit"),
    "method.mpfa.group_draws": ("method.mpfa.draw_window", "the sampler draws a class's features in one matrix "
                                "product; draw_window bounds the features generated per call"),
}


def _explain(exc: OmegaConfBaseException, origin: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError) and key in RENAMED:
        new, why = RENAMED[key]
        return f"{key} was renamed {new} ({why}): in {origin}, write {new}"
    if isinstance(exc, ConfigKeyError):
        hint = closest_key(key)
        suggestion = f" (did you mean '{hint}'?)" if hint else ""
        return f"{key}: unknown key in {origin}{suggestion}"
    if isinstance(exc, ValidationError):
        first_line = str(exc).splitlines()[0]
        return f"{key}: wrong type in {origin}: {first_line}"
    return f"{key}: {str(exc).splitlines()[0]} ({origin})"


def _merge(base: DictConfig, other: DictConfig | ListConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError([_explain(exc, origin)]) from exc


def _load_preset(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """The preset at ``path`` preceded by its ``defaults`` (depth first), as (config, origin) pairs."""
    path = path.resolve()
    if path in seen:
        raise ConfigError([f"defaults: preset cycle through {path}"])
    if not path.is_file():
        raise ConfigError([f"--config: no such file {path}"])
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come from several libraries
        raise ConfigError([f"--config: cannot parse {path}: {exc}"]) from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError([f"--config: {path} must hold a mapping at the top level"])
    layers = []
    defaults = raw.pop("defaults", [])
    for entry in defaults:
        layers += _load_preset(path.parent / str(entry), (*seen, path))
    layers.append((raw, str(path)))
    return layers


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults, then the preset (with its defaults), then dotlist overrides.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, unreadable preset.
        Value ranges are checked separately by :func:`ltdist.config.validate.validate_config`.
    """
    cfg = OmegaConf.structured(Config)
    if config_file:
        for layer, origin in _load_preset(Path(config_file)):
            cfg = _merge(cfg, layer, origin)
    overrides = list(overrides or [])
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ConfigError([f"{o}: overrides are key=value" for o in malformed])
    for item in overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    return cfg
