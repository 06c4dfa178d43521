"""What every model family provides, and the pieces UNet families share.

A family turns a diffusers pipeline into the four things a recording needs: the architecture (from
configs alone, on the meta device, before any weights load), the prompt's tokens that cross maps index,
the layer plan, and the x̂0 preview decode.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with a model, not with the registry (``generate --help`` lists the families)
    import torch

#: The embedded default model (the toy world), shipped inside the package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "model"


class ModelLoadError(RuntimeError):
    """The model could not be loaded or is not one diffviz records; the message is one line."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


@dataclass
class Peek:
    """A model's architecture as a recording needs it; ``denoiser`` may live on the meta device."""

    denoiser: Any
    vae_scale_factor: int
    tokenizers: dict[str, Any]                  # component name -> tokenizer, in the pipeline's order
    text_encoders: list[dict[str, str]]         # [{"name", "class", "tokenizer"}]
    context_length: int                         # keys of the cross-attention distribution


@dataclass
class TokenInfo:
    """The prompt's tokens as the cross maps index them (``metadata.tokens``), and where they come from."""

    tokens: list[dict]
    words: list[str]
    tokens_from: str
    token_sets: list[dict] = field(default_factory=list)


def clip_tokens(tokenizer, prompt: str) -> tuple[list[dict], list[str]]:
    """The prompt's own tokens as a CLIP pipeline sees them (start, words, end; no padding), and its words."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    texts = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    tokens, words, pending = [], [], []

    def close_word():
        if pending:
            words.append(tokenizer.decode([ids[i] for i in pending]).strip())
            pending.clear()

    for index, (token_id, text) in enumerate(zip(ids, texts)):
        is_special = token_id in special
        if is_special:
            close_word()
        tokens.append({"index": index, "id": int(token_id), "text": text,
                       "word": None if is_special else len(words), "special": is_special})
        if not is_special:
            pending.append(index)
            if text.endswith("</w>"):
                close_word()
    close_word()
    return tokens, words


#: model_index.json is a few hundred bytes; anything far larger is not one.
MAX_INDEX_BYTES = 1 << 20


def model_index(folder: Path) -> dict:
    """A pipeline folder's ``model_index.json``, size-checked before it is read; ModelLoadError (one line) if bad."""
    path = folder / "model_index.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise ModelLoadError(f"{path} is over {MAX_INDEX_BYTES} bytes; it is not a model_index.json")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {one_line(exc)}") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return index


class Family:
    """The interface; see ``capture/families/sd.py`` for the reference implementation."""

    name: str = ""
    pipeline_class: str = ""
    #: what the README's table calls it
    title: str = ""
    #: the ``contract.LAYER_KINDS`` its layers have
    kinds: tuple[str, ...] = ()

    def load(self, location: str, *, local: bool, dtype: torch.dtype):
        """The pipeline from a folder (``local``: offline) or a hub id."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        # diffusers took ``dtype`` in place of ``torch_dtype`` (now deprecated) in 0.36; the lower bound is older
        from diffusers.pipelines import pipeline_utils

        keyword = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        return cls.from_pretrained(location, local_files_only=local, **{keyword: dtype})

    #: (text encoder, tokenizer) components, in the pipeline's order
    encoders: tuple[tuple[str, str], ...] = ()

    def peek(self, folder: Path) -> Peek:
        raise NotImplementedError

    def peek_folder(self, folder: Path, denoiser: str, cls) -> Peek:
        """The architecture from a pipeline folder's configs: the ``denoiser`` component (a ``cls``) built on
        the meta device, the VAE's scale factor and the tokenizers; ModelLoadError (one line) if unreadable."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer

        needed = ["model_index.json", f"{denoiser}/config.json", "vae/config.json"] + [t for _, t in self.encoders]
        missing = [name for name in needed if not (folder / name).exists()]
        if missing:  # checked here, so that no loader ever falls back to asking a hub
            raise ModelLoadError(f"{folder} is not a {self.pipeline_class} folder (no {', '.join(missing)})")
        try:
            index = model_index(folder)
            config = cls.load_config(str(folder / denoiser), local_files_only=True)
            vae_config = AutoencoderKL.load_config(str(folder / "vae"), local_files_only=True)
            import torch

            with torch.device("meta"):
                model = cls.from_config(config)
            tokenizers = {t: AutoTokenizer.from_pretrained(str(folder / t), local_files_only=True)
                          for _, t in self.encoders}
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{folder} is not a {self.pipeline_class} folder: {one_line(exc)}") from exc
        encoders = [{"name": e, "class": str((index.get(e) or [None, "?"])[1]), "tokenizer": t}
                    for e, t in self.encoders]
        vsf = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
        return Peek(model, vsf, tokenizers, encoders, self.context(tokenizers))

    def context(self, tokenizers: dict[str, Any]) -> int:
        """Keys of the text sequence the denoiser attends to."""
        raise NotImplementedError

    def peek_pipe(self, pipe) -> Peek:
        raise NotImplementedError

    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        raise NotImplementedError

    def native_size(self, peek: Peek) -> tuple[int, int]:
        raise NotImplementedError

    def size_multiple(self, peek: Peek) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    def plan(self, peek: Peek, latent_hw: tuple[int, int], config) -> tuple[list, list[str]]:
        raise NotImplementedError

    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        """Keyword arguments of the pipeline call beyond prompt, steps, size, generator and callback."""
        return {"negative_prompt": config.negative_prompt or None, "guidance_scale": config.cfg_scale}

    def use_scheduler(self, pipe) -> None:
        """Give ``pipe`` the scheduler recordings use: DDIM, whose step output carries pred_original_sample
        (the x̂0 previews show it)."""
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def denoiser(self, pipe):
        """The module whose attention processors are recorded."""
        return pipe.unet

    def latent_channels(self, peek: Peek) -> int:
        return int(peek.denoiser.config.in_channels)

    def recorder(self, pipe, plans, tokens: TokenInfo, *, context_length: int, fail_on_shape_error: bool = False,
                 on_step=None):
        """The recorder for ``plans``; a cross-attention block sees every context slot, so ``tokens`` are not needed."""
        from capture.recorder import AttentionRecorder

        return AttentionRecorder(self.denoiser(pipe), plans, context_length=context_length,
                                 fail_on_shape_error=fail_on_shape_error, on_step=on_step)

    def callback_kwargs(self, callback) -> dict[str, Any]:
        """The pipeline-call keywords that make it call ``callback(pipe, step, timestep, {"latents": ...})`` after
        every step (``callback_on_step_end``; a pipeline with only the older ``callback`` adapts it)."""
        return {"callback_on_step_end": callback}

    def generated_size(self, peek: Peek, height: int, width: int) -> tuple[int, int]:
        """The size the pipeline generates at when asked for ``height`` x ``width`` (a family whose pipeline bins
        sizes maps them to its bin here)."""
        return height, width

    def latent_grid(self, peek: Peek, height: int, width: int) -> tuple[int, int]:
        """The latent grid ``(h, w)`` of a ``height`` x ``width`` request."""
        h, w = self.generated_size(peek, height, width)
        return h // peek.vae_scale_factor, w // peek.vae_scale_factor

    # ------------------------------------------------------------------ the bridge's cost model
    def attention_extent(self, plan, role: str, context: int) -> tuple[int, int]:
        """``(queries, keys)`` of one observed attention call of ``plan`` (role ``self``, ``cross`` or ``joint``)."""
        image = plan.native[0] * plan.native[1]
        return {"self": (image, image), "cross": (image, context)}.get(role, (image + context, image + context))

    def activation_bytes(self, peek: Peek, latent_shape, element: int) -> int:
        """The denoiser's own live tensors at its largest attention, for a CFG batch of 2: a transformer's ~18
        ``[tokens, width]`` tensors of one block (residual, norms, q/k/v, attention output, the feed-forward's 4x
        projection); a UNet family counts its skip connections too."""
        config = peek.denoiser.config
        width = int(getattr(config, "num_attention_heads", 1)) * int(getattr(config, "attention_head_dim", 1))
        patch = int(getattr(config, "patch_size", 1) or 1)
        tokens = (int(latent_shape[1]) // patch) * (int(latent_shape[2]) // patch) + int(peek.context_length)
        return 2 * 18 * tokens * width * element

    def x0(self, scheduler, sample: torch.Tensor, model_output: torch.Tensor, out) -> torch.Tensor | None:
        """x̂0 of the step just taken (DDIM/DDPM give it as ``pred_original_sample``)."""
        return getattr(out, "pred_original_sample", None)

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents as ``[batch, channels, h, w]`` (a family that packs them into tokens unpacks here)."""
        return latents

    def cfg_half(self, pipe) -> str:
        """``attention.cfg_half``: which samples the maps describe."""
        return "conditional" if getattr(pipe, "do_classifier_free_guidance", False) else "all (no CFG batch)"

    def decode_preview(self, pipe, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 of the conditional sample decoded by the VAE, as uint8 [H, W, 3] still on the device."""
        vae = pipe.vae
        image = vae.decode(x0[-1:].to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")[0]  # [3, H, W] in [0, 1]
        import torch

        return (image.permute(1, 2, 0) * 255).round().to(torch.uint8)  # as diffusers' numpy_to_pil rounds

    def describe(self, peek: Peek) -> dict[str, Any]:
        """``metadata.family``."""
        return {"name": self.name, "pipeline": self.pipeline_class, "text_encoders": list(peek.text_encoders)}
