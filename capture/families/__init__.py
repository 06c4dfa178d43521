"""Model families: the one seam between diffviz and a diffusers pipeline class.

A family is chosen from ``model_index.json``'s ``_class_name``: read locally for a folder, through
diffusers' own (offline-aware) config loader for a hub id. A new family is one module in this package
plus one line in :data:`REGISTRY`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from capture.config import model_source
from capture.families.base import DEFAULT_MODEL_DIR, Family, ModelLoadError, Peek, TokenInfo, model_index, one_line

#: pipeline class name -> family module (in this package)
REGISTRY: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart",
    "QwenImagePipeline": "qwen_image",
    "Flux2Pipeline": "flux2",
    "SanaPipeline": "sana",
}

__all__ = ["REGISTRY", "Family", "ModelLoadError", "Peek", "TokenInfo", "family_named", "for_model",
           "for_pipeline", "pipeline_class_of", "DEFAULT_MODEL_DIR", "markdown_table"]


def family_named(name: str) -> Family:
    """The family registered under module ``name`` (``sd``, ``sdxl``)."""
    if name not in REGISTRY.values():
        raise ModelLoadError(f"no model family {name!r}; families: {', '.join(sorted(set(REGISTRY.values())))}")
    return importlib.import_module(f"capture.families.{name}").FAMILY


def _for_class(class_name: str, where: str) -> Family:
    module = REGISTRY.get(class_name)
    if module is None:
        supported = ", ".join(f"{cls} ({mod})" for cls, mod in REGISTRY.items())
        raise ModelLoadError(f"{where}: pipeline class {class_name} is not supported; supported families: {supported}")
    return family_named(module)


def pipeline_class_of(model: str | None) -> str:
    """``_class_name`` of the model's ``model_index.json``; ModelLoadError (one line) when it cannot be read."""
    source, location = model_source(model)
    if source == "hub":
        from diffusers import DiffusionPipeline

        try:  # honours HF_HUB_OFFLINE and the local cache, as from_pretrained does
            index = DiffusionPipeline.load_config(location)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one line
            raise ModelLoadError(f"could not read model_index.json of {location!r}: {one_line(exc)}") from exc
    else:
        index = model_index(DEFAULT_MODEL_DIR if source == "default" else Path(location))
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model_index.json of {model or 'the default model'} names no _class_name")
    return name


def for_model(model: str | None) -> Family:
    """The family that records ``model`` (None = the embedded default)."""
    return _for_class(pipeline_class_of(model), str(model or "the default model"))


def for_pipeline(pipe) -> Family:
    """The family of an already loaded pipeline."""
    return _for_class(type(pipe).__name__, "pipeline")


def markdown_table() -> str:
    """The README's table of supported pipeline classes, from :data:`REGISTRY` and each family's declarations."""
    rows = ["| pipeline class | family | model | layer kinds | text encoders |", "|---|---|---|---|---|"]
    for cls, module in REGISTRY.items():
        family = family_named(module)
        encoders = ", ".join(encoder for encoder, _ in family.encoders)
        kinds = ", ".join(f"`{kind}`" for kind in family.kinds)
        rows.append(f"| `{cls}` | `{family.name}` | {family.title} | {kinds} | {encoders} |")
    return "\n".join(rows)
