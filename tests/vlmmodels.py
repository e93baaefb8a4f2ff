"""Tiny random vision-language models saved to folders, for offline tests and benchmarks.

Each builder writes processor + model (``save_pretrained``) into one folder that
``AutoProcessor`` / ``AutoModelForImageTextToText`` load back with no network. The
weights are random (seeded), so the text is gibberish: tests assert structure,
determinism and batching, never meaning. Random models often emit EOS at once, so
callers set ``min_new_tokens``.

Recipes: /work/shared/reference/offline-models.md (transformers 5.x). Heavy imports
happen inside the builders so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Plain words for the word-level vocabulary; the model picks among them at random.
_WORDS = (
    "a an the of and with in on at is are to this that image picture photo shows "
    "person woman man girl boy cat dog tree sky red green blue white black yellow "
    "sitting standing holding wearing dress shirt hat hair long short smiling outdoor "
    "indoor room table chair window street car grass water field flower book cup light "
    "describe detail what does it caption tags name folder one two three , . : ? !"
)
WORDS = tuple(_WORDS.split())

# A chat template that renders content lists (image + text parts) for any role.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tokenizer(
    specials: list[str], *, extra: dict[str, str] | None = None, vocab_size: int = 0, **named: str
) -> Any:
    """Word-level fast tokenizer: ``specials`` first (ids 0..), then WORDS, then filler
    words ``w0, w1, ...`` up to ``vocab_size`` (for benchmarks of realistic shape)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [*specials, *WORDS]:
        vocab.setdefault(tok, len(vocab))
    filler = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{filler}", len(vocab))
        filler += 1
    unk = named.get("unk_token", "<unk>")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    kwargs: dict[str, Any] = dict(named)
    if extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **kwargs)


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_llava(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch: int = 8,
    vocab_size: int = 0,
    seed: int = 0,
) -> Path:
    """A LLaVA (CLIP vision tower + Llama) model; JoyCaption's ``-hf-llava`` layout."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    _seed(seed)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tok = _tokenizer(
        specials,
        vocab_size=vocab_size,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = len(tok)
    improc = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_hidden // 16),
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return _save(LlavaForConditionalGeneration(config).eval(), tok, processor, folder)


def build_idefics3(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 64,
    patch: int = 16,
    scale_factor: int = 2,
    seed: int = 0,
) -> Path:
    """An Idefics3 / SmolVLM model (SigLIP-like vision + pixel shuffle + Llama)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    _seed(seed)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = [
        "<pad>",
        "<unk>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *grid,
    ]
    tok = _tokenizer(
        specials,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        extra={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    seq_len = (image_size // patch) ** 2 // (scale_factor**2)
    improc = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=improc,
        tokenizer=tok,
        image_seq_len=seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_hidden // 16),
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=image_id,
        scale_factor=scale_factor,
        pad_token_id=tok.pad_token_id,
    )
    return _save(Idefics3ForConditionalGeneration(config).eval(), tok, processor, folder)


def build_florence2(
    folder: Path, *, d_model: int = 32, layers: int = 2, image_size: int = 64, seed: int = 0
) -> Path:
    """A Florence-2 model (DaViT vision + BART encoder-decoder)."""
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    _seed(seed)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tok = _tokenizer(
        specials,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra={"image_token": "<image>"},
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    improc = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
    )
    improc.image_seq_length = (image_size // 32) ** 2 + 1
    processor = Florence2Processor(
        image_processor=improc, tokenizer=tok, post_processor_config={"pure_text": {}}
    )
    dims = (8, 16, 16, d_model)
    config = Florence2Config(
        vision_config=Florence2VisionConfig(
            depths=(1, 1, 1, 1),
            embed_dim=dims,
            num_heads=(1, 2, 2, 4),
            num_groups=(1, 2, 2, 4),
            window_size=2,
            projection_dim=d_model,
            drop_path_rate=0.0,
        ),
        text_config=BartConfig(
            vocab_size=len(tok),
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=d_model * 2,
            decoder_ffn_dim=d_model * 2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
        ),
        image_token_id=image_id,
    )
    return _save(Florence2ForConditionalGeneration(config).eval(), tok, processor, folder)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_5_vl(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    patch: int = 8,
    max_side: int = 32,
    seed: int = 0,
) -> Path:
    """A Qwen2.5-VL model (windowed ViT with 2x2 patch merging + Qwen2 with M-RoPE).
    Images are resized to at most ``max_side``² pixels: a few image tokens each."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    _seed(seed)
    specials = [
        "<|endoftext|>",
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = _tokenizer(
        specials,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    merge = 2
    pixels = {"min_pixels": (patch * merge) ** 2, "max_pixels": max_side * max_side}
    improc = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        **pixels,
    )
    vidproc = Qwen2VLVideoProcessor(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=improc,
        tokenizer=tok,
        video_processor=vidproc,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    head_dim = hidden // heads
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_layers,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_heads": max(1, vision_hidden // 16),
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "window_size": patch * merge * 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [vision_layers - 1],
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return _save(Qwen2_5_VLForConditionalGeneration(config).eval(), tok, processor, folder)


# moondream2 is not in transformers: its repository ships its own model code, loaded
# with trust_remote_code through config.json's auto_map. This stand-in has moondream's
# interface (caption(image, length, settings) and query(image, question, settings))
# and a real, if tiny, model: the words come from a linear layer over the image's mean
# colour, so a red image is captioned "red ...".
MOONDREAM_CODE = """
import torch
from transformers import PretrainedConfig, PreTrainedModel

LENGTHS = {"short": 2, "normal": 4, "long": 8}


class TinyMoondreamConfig(PretrainedConfig):
    model_type = "moondream1"

    def __init__(self, words=None, **kwargs):
        self.words = list(words or [])
        super().__init__(**kwargs)


class TinyMoondream(PreTrainedModel):
    config_class = TinyMoondreamConfig
    base_model_prefix = "moondream"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.score = torch.nn.Linear(3, len(config.words))
        self.post_init()

    def _init_weights(self, module):
        pass

    def _ranked(self, image):
        small = image.convert("RGB").resize((8, 8))
        rgb = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(-1, 3)
        x = (rgb.float().mean(dim=0) / 255.0).to(self.score.weight.dtype)
        with torch.inference_mode():
            order = torch.argsort(self.score(x), descending=True, stable=True)
        return [self.config.words[i] for i in order.tolist()]

    def caption(self, image, length="normal", stream=False, settings=None):
        n = min(LENGTHS[length], (settings or {}).get("max_tokens", 1 << 30))
        return {"caption": " ".join(self._ranked(image)[:n])}

    def query(self, image, question, stream=False, settings=None):
        n = min(3, (settings or {}).get("max_tokens", 1 << 30))
        words = [*self._ranked(image)[: n - 1], question.split()[-1].strip("?")]
        return {"answer": " ".join(words[:n])}
"""

MOONDREAM_WORDS = ("red", "green", "blue", "a", "photo", "of", "the", "cat", "on", "grass")


def build_moondream2(folder: Path, *, seed: int = 0) -> Path:
    """A local moondream2-style repository: ``config.json`` with ``auto_map`` to
    ``modeling_tinymoondream.py`` beside it, and safetensors weights. Name the folder
    with "moondream" in it: that is how the family is recognised."""
    import importlib.util
    import json

    import torch

    _seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    code = folder / "modeling_tinymoondream.py"
    code.write_text(MOONDREAM_CODE)
    spec = importlib.util.spec_from_file_location(f"tinymoondream_{seed}", code)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.TinyMoondreamConfig(words=MOONDREAM_WORDS)
    model = module.TinyMoondream(config).eval()
    with torch.no_grad():  # colour words follow the channels; the rest in a fixed order
        weight = torch.zeros(len(MOONDREAM_WORDS), 3)
        weight[0, 0] = weight[1, 1] = weight[2, 2] = 10.0
        model.score.weight.copy_(weight)
        model.score.bias.copy_(torch.linspace(3.0, 0.0, len(MOONDREAM_WORDS)) * 0.5)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "modeling_tinymoondream.TinyMoondreamConfig",
        "AutoModelForCausalLM": "modeling_tinymoondream.TinyMoondream",
    }
    cfg["architectures"] = ["TinyMoondream"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _save(model: Any, tok: Any, processor: Any, folder: Path) -> Path:
    """The model with the tokenizer's special ids for generate(), and its processor,
    saved as a Hub folder."""
    _set_generation_ids(model, tok)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def _set_generation_ids(model: Any, tok: Any) -> None:
    gc = model.generation_config
    gc.pad_token_id = tok.pad_token_id
    gc.eos_token_id = tok.eos_token_id
    if tok.bos_token_id is not None:
        gc.bos_token_id = tok.bos_token_id


BUILDERS = {
    "llava": build_llava,
    "idefics3": build_idefics3,
    "florence2": build_florence2,
    "qwen2_5_vl": build_qwen2_5_vl,
}
