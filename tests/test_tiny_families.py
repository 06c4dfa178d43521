"""The tiny Qwen-Image, FLUX.2 and SANA pipelines: they reload offline, run 2 non-square steps deterministically,
and their tokenizers lay out the prompt as the real pipelines do."""
from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline  # noqa: E402

from tests.tiny_families import RUN_KWARGS, tiny_family  # noqa: E402

PIPELINES = {"qwen_image": "QwenImagePipeline", "flux2": "Flux2Pipeline", "sana": "SanaPipeline"}
PROMPT = "a big red circle on the left"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    def load(name):
        pipe = DiffusionPipeline.from_pretrained(str(tiny_family(name, tmp_path_factory)), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load


def _run(pipe, name, seed):
    return pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **RUN_KWARGS[name]).images


@pytest.mark.parametrize("name, calls, batch", [("qwen_image", 4, 1), ("flux2", 2, 1), ("sana", 2, 2)])
def test_reloads_offline_and_runs_two_steps_deterministically(loaded, name, calls, batch):
    pipe = loaded(name)
    assert type(pipe).__name__ == PIPELINES[name]
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: seen.append(
        (kwargs.get("hidden_states", args[0] if args else None)).shape[0]), with_kwargs=True)
    try:
        first = _run(pipe, name, 0)
    finally:
        hook.remove()
    # the denoiser ran once per step and CFG branch, with the family's CFG batch
    assert seen == [batch] * calls
    kwargs = RUN_KWARGS[name]
    assert first.shape == (1, 3, kwargs["height"], kwargs["width"])
    assert torch.isfinite(first).all()
    assert torch.equal(first, _run(pipe, name, 0))
    assert not torch.equal(first, _run(pipe, name, 1))


def test_qwen_template_is_34_tokens_and_the_prompt_follows_it(loaded):
    pipe = loaded("qwen_image")
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    assert drop == 34
    prefix = template.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == drop
    ids = pipe.tokenizer(template.format(PROMPT)).input_ids
    words = pipe.tokenizer(PROMPT).input_ids
    assert len(words) == len(PROMPT.split())
    assert ids[drop:drop + len(words)] == words
    embeds, mask = pipe.encode_prompt(PROMPT, device="cpu")
    # the prompt's tokens, then the template's 5 closing tokens (<|im_end|> \n <|im_start|> assistant \n)
    assert embeds.shape[1] == len(ids) - drop == len(words) + 5
    assert mask is None  # one prompt: nothing padded, so the pipeline passes no mask


def test_flux2_prompt_sits_between_inst_tags_in_512_tokens(loaded):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    pipe = loaded("flux2")
    assert pipe.text_encoder.config.text_config.num_hidden_layers >= 30  # hidden states 10, 20, 30 are stacked
    tokens = pipe.tokenizer.apply_chat_template(format_input([PROMPT]), add_generation_prompt=False, tokenize=True,
                                                return_dict=True, padding="max_length", truncation=True,
                                                max_length=512)
    pieces = pipe.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])
    start, end = pieces.index("[INST]"), pieces.index("[/INST]")
    assert pieces[0] == "<s>" and pieces[1] == "[SYSTEM_PROMPT]"
    assert end - start - 1 == len(PROMPT.split())
    assert sum(tokens["attention_mask"][0]) == end + 1 and set(pieces[end + 1:]) == {"<pad>"}
    embeds, text_ids = pipe.encode_prompt(PROMPT, device="cpu")
    hidden = pipe.text_encoder.config.text_config.hidden_size
    assert embeds.shape == (1, 512, 3 * hidden) and text_ids.shape == (1, 512, 4)


def test_sana_keeps_bos_then_the_prompt_in_300_tokens(loaded):
    from diffusers import SanaPipeline

    pipe = loaded("sana")
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPT, device="cpu",
                                                               complex_human_instruction=instruction)
    # of instruction + prompt, the pipeline keeps <bos> and the last 299 tokens: the prompt starts right after <bos>
    assert embeds.shape[1] == negative.shape[1] == 300
    assert int(mask.sum()) == 1 + len(PROMPT.split()) and bool(mask[0, :1 + len(PROMPT.split())].all())
    assert int(negative_mask.sum()) == 1  # "" is <bos> alone
    ids = pipe.tokenizer(PROMPT).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids[0]) == "<bos>" and len(ids) == 1 + len(PROMPT.split())
