"""Tiny random-weight pipelines of the newer families (Qwen-Image, FLUX.2, SANA), built from configs and saved.

Every tokenizer is built in code with the ``tokenizers`` library: a BPE trained on the words the pipeline's own
prompt template (or system message, or instruction) uses plus the toy world's words, so that each of those words
is one token, as it is for the real tokenizers. Each pipeline reloads with
``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

from capture.toyworld.world import VOCABULARY


def _trained_bpe(texts: list[str], pre_tokenizer=None, normalizer=None, special_tokens=(), alphabet=(), unk=None):
    """A BPE over ``texts``, trained until every word in them is a single token; returns (vocab, merges).

    Without a pre-tokenizer each text is one word."""
    from tokenizers import Tokenizer, models, trainers

    backend = Tokenizer(models.BPE(unk_token=unk))
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        backend.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, special_tokens=list(special_tokens),
                                  initial_alphabet=list(alphabet), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _words_text() -> str:
    return " ".join(VOCABULARY)


# --------------------------------------------------------------------------------------------------- Qwen-Image

def qwen_tokenizer(template: str):
    """A Qwen2Tokenizer (byte-level BPE, Qwen's split regex) in which each word of ``template`` is one token."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = template.replace("{}", _words_text())
    for token in specials:
        text = text.replace(token, "\n")
    pre = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    vocab, merges = _trained_bpe([text, *VOCABULARY, *(" " + w for w in VOCABULARY)], pre,
                                 special_tokens=specials, alphabet=pre_tokenizers.ByteLevel.alphabet())
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=specials[1:])


def build_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """A QwenImagePipeline: 2 double-stream blocks (heads 2 x 16, rotary axes 8+4+4), a 2-layer Qwen2.5-VL text
    encoder (hidden 16), a Wan-style VAE with 4 latent channels and spatial factor 4 (so sizes are multiples of 8)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=transformer)
    tokenizer = qwen_tokenizer(pipe.prompt_template_encode)
    text_config = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                   "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                   "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(text_config=text_config,
                              vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                             "out_hidden_size": 16},
                              vocab_size=len(tokenizer))
    pipe.register_modules(tokenizer=tokenizer, text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval())
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------------- FLUX.2

#: The shape of Mistral-Small-3.1's chat template (what ``Flux2Pipeline.format_input`` feeds): ``<s>``, the system
#: message in [SYSTEM_PROMPT] tags, each user turn in [INST] tags; content is a string or a list of text blocks.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def mistral_tokenizer(system_message: str):
    """A byte-level BPE (a stand-in for FLUX.2's PixtralProcessor, which needs torchvision) with Mistral's special
    tokens and chat template, in which each word of ``system_message`` is one token; pads on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _trained_bpe([system_message, _words_text(), *VOCABULARY], pre, special_tokens=specials,
                                 alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[3:7],
                                   chat_template=MISTRAL_CHAT_TEMPLATE, padding_side="right", model_max_length=512)


def build_flux2(folder: str | Path, seed: int = 0) -> Path:
    """A Flux2Pipeline: 1 double-stream and 2 parallel single-stream blocks (heads 2 x 16, rotary axes 4+4+4+4), a
    30-layer Mistral3 text encoder (hidden 8; the pipeline stacks hidden states 10, 20, 30, so 24 channels per
    token), a VAE with 4 latent channels, spatial factor 2 and batch-norm statistics that are not the identity."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    latent_channels, hidden = 4, 8
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                          num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=3 * hidden, axes_dims_rope=(4, 4, 4, 4))
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                             use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # decoding un-normalises with these; random values make that step observable
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    tokenizer = mistral_tokenizer(SYSTEM_MESSAGE)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>"))}
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 16, "num_hidden_layers": 30, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 1024, "sliding_window": None,
                     **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "image_size": 16, "patch_size": 8, "head_dim": 4},
        image_token_index=len(tokenizer) - 1, **ids)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                         text_encoder=Mistral3ForConditionalGeneration(config).eval(), tokenizer=tokenizer,
                         transformer=transformer)
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------------------------------------- SANA

def gemma_tokenizer(instruction: str):
    """A GemmaTokenizer (spaces become "▁", whole-string BPE, adds ``<bos>``) in which each word of ``instruction``
    and of the toy world is one token, with and without its leading "▁"."""
    from tokenizers import normalizers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    words = (instruction + "\n" + _words_text()).replace(" ", "\u2581")
    units = re.findall(r"\u2581?\w+|\u2581?[^\w\u2581]|\u2581", words) + list(VOCABULARY)
    # trained on words, so that no merge spans two of them (Gemma's BPE runs over the whole string)
    vocab, merges = _trained_bpe(units, normalizer=normalizers.Replace(" ", "\u2581"), special_tokens=specials,
                                 alphabet=sorted(set(words)), unk="<unk>")
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def build_sana(folder: str | Path, seed: int = 0) -> Path:
    """A SanaPipeline: 2 blocks, each a linear (ReLU-kernel) self-attention with heads 2 x 8 and an SDPA cross-attention
    with heads 2 x 8, a 1-layer Gemma2 text encoder (hidden 16), a DC-AE with 4 latent channels and spatial factor 32
    (as the real f32c32 one), and the flow-DPM-Solver scheduler that diffusers' SANA conversion script configures.
    ``sample_size=16`` selects the 512-px aspect-ratio bins (a request is generated at its bin, e.g. 32x64 at
    352x704: 11x22 tokens), as for the real 512-px checkpoint."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                         sample_size=16)
    stages = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=stages,
                        decoder_block_types=stages, encoder_block_out_channels=(8,) * 6,
                        decoder_block_out_channels=(8,) * 6, encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
                        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, encoder_layers_per_block=(1,) * 6,
                        decoder_layers_per_block=(1,) * 6, downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    instruction = "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
    tokenizer = gemma_tokenizer(instruction)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae, transformer=transformer,
                        scheduler=scheduler)
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------------ shared

BUILDERS = {"qwen_image": build_qwen_image, "flux2": build_flux2, "sana": build_sana}

#: A 2-step non-square call per family, as the tests run it. Qwen-Image with its true CFG (a negative prompt and
#: true_cfg_scale > 1: two transformer calls per step); FLUX.2 is guidance-distilled (one call); SANA batches
#: [uncond, cond] in one call; its 352x704 is one of its aspect-ratio bins (binning on, the default), 11x22 tokens.
RUN_KWARGS = {
    "qwen_image": {"height": 32, "width": 48, "negative_prompt": " ", "true_cfg_scale": 4.0},
    "flux2": {"height": 32, "width": 48},
    "sana": {"height": 352, "width": 704},
}

_BUILT: dict[tuple[str, str], Path] = {}


def tiny_family(name: str, tmp_path_factory) -> Path:
    """The folder of family ``name``, built once per test session (under pytest's base temporary folder)."""
    key = (name, str(tmp_path_factory.getbasetemp()))
    if key not in _BUILT:
        _BUILT[key] = BUILDERS[name](tmp_path_factory.mktemp("families") / name)
    return _BUILT[key]
