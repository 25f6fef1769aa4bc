"""study/pitfalls.yaml as bash variables for study/pitfalls.sh: ``eval "$(python study/pitfalls_settings.py)"``.

The settings live in the YAML file, which study/pitfalls_report.py reads too; this reader needs only
PyYAML and the registry, so the grid script does not pay TensorFlow's start-up to learn them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from transferlab import backbones

PATH = Path(__file__).with_name("pitfalls.yaml")


def load(path: Path = PATH) -> dict:
    return yaml.safe_load(path.read_text())


def override(key: str, value) -> str:
    """One ``-S key=value`` argument as DVC reads it (YAML), compact: ``finetune.methods=[a,b]``."""
    return f"{key}={_value(value)}"


def _value(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def study_params(study: dict) -> dict:
    """The study-wide params: the BatchNorm network with offline weights (its BatchNorm pitfalls need
    BatchNorm layers, and the study runs offline), from the registry, then the YAML's."""
    return {"finetune.backbones": [backbones.offline_batchnorm()], **study["study_params"]}


def shell(study: dict) -> str:
    """Bash assignments: DEFAULT_SEEDS, DEFAULT_STUDY_PARAMS, DEFAULT_SETTINGS, OPTIONAL_SETTINGS and
    the associative array SETTING_PARAMS (setting -> its space-separated overrides)."""
    settings = study["settings"]
    unknown = sorted(set(study["optional"]) - set(settings))
    if unknown:
        raise SystemExit(f"{PATH.name}: optional settings that are not defined: {', '.join(unknown)}")
    words = {
        "DEFAULT_SEEDS": " ".join(map(str, study["seeds"])),
        "DEFAULT_STUDY_PARAMS": " ".join(override(k, v) for k, v in study_params(study).items()),
        "DEFAULT_SETTINGS": " ".join(s for s in settings if s not in study["optional"]),
        "OPTIONAL_SETTINGS": " ".join(study["optional"]),
    }
    lines = [f"{name}={shlex.quote(value)}" for name, value in words.items()]
    pairs = " ".join(
        f"[{shlex.quote(s)}]={shlex.quote(' '.join(override(k, v) for k, v in p.items()))}" for s, p in settings.items()
    )
    return "\n".join([*lines, f"declare -A SETTING_PARAMS=({pairs})"])


if __name__ == "__main__":
    print(shell(load()))
