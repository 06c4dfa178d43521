"""The toy world's MM-DiT: a complete, tiny Stable-Diffusion-3-format pipeline, and its attention probe.

``build_mmdit_pipeline`` makes a ``StableDiffusion3Pipeline`` from small configs in code: an
``SD3Transformer2DModel`` on the toy VAE's 8×8×8 latents (patch size 1, so one image token per
latent cell), two tiny ``CLIPTextModelWithProjection`` encoders with the toy CLIP tokenizer, and a
tiny ``T5EncoderModel`` with a T5 tokenizer built from the world's vocabulary (``build_t5_tokenizer``).

``JointProbeProcessor`` computes what diffusers' ``JointAttnProcessor2_0`` computes, with an
explicit softmax over the whole joint sequence ([image; text], as SD3 orders it), and keeps the
head-mean image->text probabilities ``[B, HW, T]`` with their autograd graph, so the grounding loss
trains the attention the model uses.
"""
from __future__ import annotations

import torch

from capture.toyworld.architecture import DEFAULT_WORDS, LATENT_CHANNELS, LATENT_SIZE, build_tokenizer
from capture.toyworld.probe import ProbeStore

#: T5 context: a caption has at most 14 words, plus T5's closing ``</s>``.
T5_LENGTH = 16
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
#: SentencePiece's word-start marker: each vocabulary word is one piece "▁word".
SPIECE = "\u2581"

#: Sizes of the shipped MM-DiT (``build_mmdit_pipeline``'s defaults).
CLIP_WIDTH = 32
T5_WIDTH = 2 * CLIP_WIDTH   # SD3 pads the joined CLIP states to the T5 width; equal here, so no padding


def build_t5_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS):
    """A ``T5TokenizerFast`` whose pieces are exactly "▁" + each word: one token per vocabulary word.

    A ``tokenizers`` Unigram model (ids: pad 0, eos 1, unk 2, then the words) behind a Metaspace
    pre-tokenizer, with T5's post-processing (``</s>`` after the text, no BOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)] + [(SPIECE + w, -1.0) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPIECE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token=T5_EOS, pad_token=T5_PAD, unk_token=T5_UNK,
                           extra_ids=0, additional_special_tokens=[], model_max_length=T5_LENGTH)


def build_mmdit_pipeline(vae, words: tuple[str, ...] = DEFAULT_WORDS, *, layers: int = 4, heads: int = 4,
                         head_dim: int = 16, clip_layers: int = 2, t5_layers: int = 1, shift: float = 1.0,
                         seed: int = 0):
    """A randomly initialised SD3-shaped toy pipeline around the (trained) toy ``vae``.

    * **Transformer**: ``layers`` joint (MM-DiT) blocks, ``heads`` × ``head_dim`` wide, patch size 1
      on the 8×8 latent grid (64 image tokens), text sequence 16 CLIP + 16 T5 tokens.
    * **Text encoders**: two CLIP text models with projection (``clip_layers`` causal layers: SD3
      reads the penultimate layer, so two layers give one that has seen the caption), and a
      ``t5_layers`` T5 encoder; all see the same prompt and are trained with the transformer.
    * **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (1: 64 image tokens are far
      fewer than SD3's 256-token base resolution, so no shift towards noise is needed).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    tokenizer_3 = build_t5_tokenizer(words)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
            projection_dim=CLIP_WIDTH, num_hidden_layers=clip_layers, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))

    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH, num_layers=t5_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ))
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=LATENT_SIZE,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def t5_ids(words, word_ids: dict, eos: int, pad: int, length: int = T5_LENGTH):
    """T5 token ids [n, length] exactly as the pipeline's tokenizer_3 pads them: words, </s>, <pad>…"""
    import numpy as np
    ids = np.full((len(words), length), pad, dtype=np.int64)
    for i, ws in enumerate(words):
        if len(ws) > length - 1:
            raise ValueError(f"caption of {len(ws)} words does not fit {length} T5 tokens")
        ids[i, :len(ws)] = [word_ids[w] for w in ws]
        ids[i, len(ws)] = eos
    return ids


def encode(pipe, clip_ids: torch.Tensor, t5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 16 + 16, D], pooled [B, 2 * CLIP_WIDTH]) from token ids, as ``encode_prompt`` makes them.

    Differentiable (the pipeline's own ``encode_prompt`` tokenizes strings and runs without a graph).
    """
    states, pooled = [], []
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        out = enc(clip_ids, output_hidden_states=True)
        pooled.append(out[0])
        states.append(out.hidden_states[-2])
    clip = torch.cat(states, dim=-1)
    width = pipe.transformer.config.joint_attention_dim
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    t5_states = pipe.text_encoder_3(t5)[0]
    return torch.cat([clip, t5_states], dim=-2), torch.cat(pooled, dim=-1)


class JointProbeProcessor:
    """A joint-attention processor equal to ``JointAttnProcessor2_0`` that keeps the image->text probabilities.

    The softmax runs over the whole joint sequence [image; text]; what is stored is the head mean of
    its image-query rows, text-key columns: ``[B, HW, T]`` (rows sum to < 1).
    """

    def __init__(self, name: str, store: ProbeStore):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("JointProbeProcessor handles joint (image + text) attention without a mask only")
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x, norm=None):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                           heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                         heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        head_dim = query.shape[-1]
        probs = (torch.matmul(query, key.transpose(-1, -2)) * head_dim ** -0.5).float().softmax(dim=-1)
        if self.store.enabled:
            self.store.maps[self.name] = probs[:, :, :n_img, n_img:].mean(dim=1)
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


def install(transformer, store: ProbeStore) -> list[str]:
    """A ``JointProbeProcessor`` on every joint block; returns the block names ("transformer_blocks.i") in order."""
    procs, names = {}, []
    for name in transformer.attn_processors:
        block = name[: -len(".attn.processor")]
        procs[name] = JointProbeProcessor(block, store)
        names.append(block)
    transformer.set_attn_processor(procs)
    return sorted(names, key=lambda n: int(n.split(".")[1]))


def uninstall(transformer) -> None:
    """Back to diffusers' default joint processor."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    transformer.set_attn_processor(JointAttnProcessor2_0())
