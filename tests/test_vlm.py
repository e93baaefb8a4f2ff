"""The VLM generator on tiny random models built offline (tests/vlmmodels.py).

The models' text is gibberish; the tests assert structure (one string per image),
determinism, left-padded batching, Florence-2 post-processing, family detection,
prompt variables, the remote-code opt-in, unloading and error classification.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

os.environ["HF_HUB_OFFLINE"] = "1"

from daemon.errors import (
    ErrorType,
    GenerationError,
    ModelDownloadError,
    ModelUnavailableError,
    NetworkError,
    classify,
)
from daemon.generators import vlm as vlm_mod
from daemon.generators.base import ImageInput, WeightClass
from daemon.generators.registry import discover
from daemon.generators.vlm import (
    PromptVariableError,
    VLMConfig,
    VLMGenerator,
    VLMItem,
    pull,
    render_prompt,
    shrink,
    strip_task_tokens,
)
from daemon.generators.vlm_families import detect_family
from tests.deps import require

require("torch", "the vlm extra")
require("transformers", "the vlm extra")

from tests.hubstub import busy_hub, unreachable_hub  # noqa: E402
from tests.vlmmodels import BUILDERS  # noqa: E402

# One worker builds the tiny models once (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("vlm_models")

TOKENS = 6
CHAT_PROMPT = "describe {name} in {folder}"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model folder per family (built once, about a second in all)."""
    return {fam: build(tmp_path_factory.mktemp(fam)) for fam, build in BUILDERS.items()}


def make(folder: Path, **cfg: Any) -> VLMGenerator:
    cfg.setdefault("max_new_tokens", TOKENS)
    cfg.setdefault("min_new_tokens", TOKENS)
    gen = VLMGenerator(VLMConfig(model=str(folder), **cfg))
    gen.load()
    return gen


@pytest.fixture(scope="session")
def gens(model_dirs: dict[str, Path]) -> dict[str, VLMGenerator]:
    """Loaded generators, shared by the tests that only generate."""
    return {
        "llava": make(model_dirs["llava"], prompt=CHAT_PROMPT),
        "idefics3": make(model_dirs["idefics3"], prompt=CHAT_PROMPT),
        "florence2": make(model_dirs["florence2"], prompt="<CAPTION>"),
        "qwen2_5_vl": make(model_dirs["qwen2_5_vl"], prompt=CHAT_PROMPT),
    }


def images(n: int = 3) -> list[ImageInput]:
    """Different sizes, colours and names (so the prompts differ in length)."""
    out = []
    for i in range(n):
        img = Image.new("RGB", (40 + 31 * i, 30 + 17 * i), (70 * i % 256, 120, 255 - 60 * i))
        name = " ".join(["cat"] * (1 + 3 * i))  # 1, 4, 7 words: different prompt lengths
        out.append(ImageInput(Path(f"/data/set/img{i}.png"), img, {"name": name, "folder": "set"}))
    return out


def prepared(gen: VLMGenerator, n: int = 3) -> list[VLMItem]:
    return [gen.prepare(item) for item in images(n)]


# -- generation -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "idefics3", "florence2", "qwen2_5_vl"])
def test_batch_of_three_gives_three_strings(gens: dict[str, VLMGenerator], family: str) -> None:
    gen = gens[family]
    out = gen.generate(prepared(gen))
    assert len(out) == 3
    assert all(isinstance(t, str) and t.strip() for t in out)


@pytest.mark.parametrize("family", ["llava", "idefics3", "florence2", "qwen2_5_vl"])
def test_greedy_is_deterministic(gens: dict[str, VLMGenerator], family: str) -> None:
    gen = gens[family]
    items = prepared(gen)
    assert gen.generate(items) == gen.generate(items)


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_5_vl"])
def test_batched_equals_one_at_a_time(gens: dict[str, VLMGenerator], family: str) -> None:
    gen = gens[family]
    items = prepared(gen)
    tok = gen._processor.tokenizer
    assert tok.padding_side == "left"
    lengths = {len(tok(it.text)["input_ids"]) for it in items}
    assert len(lengths) == 3, "the prompts must differ in length for padding to matter"
    batched = gen.generate(items)
    single = [gen.generate([it])[0] for it in items]
    assert batched == single


def test_new_tokens_only_no_prompt_echo(gens: dict[str, VLMGenerator]) -> None:
    gen = gens["llava"]
    out = gen.generate(prepared(gen, 1))[0]
    assert "USER" not in out and "ASSISTANT" not in out
    assert len(out.split()) <= TOKENS


def test_florence_output_has_no_task_or_special_tokens(gens: dict[str, VLMGenerator]) -> None:
    gen = gens["florence2"]
    items = prepared(gen)
    assert items[0].text == "<CAPTION>"
    out = gen.generate(items)
    for text in out:
        assert not re.search(r"</?s>|<pad>|<[A-Z_]+>|<loc_\d+>", text), text
        assert text == " ".join(text.split())
    # The raw decoder output does carry special tokens: the stripping did real work.
    import torch

    proc = gen._processor
    inputs = proc(text=["<CAPTION>"], images=[items[0].image], return_tensors="pt")
    with torch.inference_mode():
        raw = gen._model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    assert "</s>" in proc.tokenizer.decode(raw[0], skip_special_tokens=False)


def test_strip_task_tokens() -> None:
    raw = "</s><s><CAPTION> A red car <loc_12><loc_40> on a road.</s><pad><pad>"
    assert strip_task_tokens(raw) == "A red car on a road."
    assert strip_task_tokens("x <unk> y", ["<unk>"]) == "x y"


def test_florence_takes_free_text_as_its_detailed_caption_task(
    model_dirs: dict[str, Path],
) -> None:
    """Issue 10, item 6: Florence-2 takes task tokens; a free-text prompt is sent as the
    fitting task, said once in the log, and the settings validate."""
    import structlog

    cfg = VLMConfig(model="x", family="florence2", prompt="Describe {tags} in detail")
    assert VLMGenerator(cfg).prompt == "<DETAILED_CAPTION>"
    assert VLMGenerator(cfg).context_keys == frozenset()  # {tags} is not needed any more
    with structlog.testing.capture_logs() as logs:
        gen = make(model_dirs["florence2"], prompt="Describe this picture, {name}.")
        try:
            assert gen.prompt == "<DETAILED_CAPTION>"
            items = prepared(gen, 2) + prepared(gen, 1)
            assert {(i.prompt, i.text) for i in items} == {("<DETAILED_CAPTION>",) * 2}
            out = gen.generate(items)
            assert len(out) == 3 and all(t.strip() for t in out)
        finally:
            gen.unload()
    mapped = [e for e in logs if e["event"] == "vlm_prompt_mapped_to_task"]
    assert len(mapped) == 1  # once, at load; not per image
    assert mapped[0]["task"] == "<DETAILED_CAPTION>"
    assert mapped[0]["prompt"] == "Describe this picture, {name}."
    # A task token is sent as it is, and says nothing in the log.
    with structlog.testing.capture_logs() as logs:
        gen = make(model_dirs["florence2"], prompt="<MORE_DETAILED_CAPTION>")
    try:
        assert gen.prompt == "<MORE_DETAILED_CAPTION>"
        assert not [e for e in logs if e["event"] == "vlm_prompt_mapped_to_task"]
    finally:
        gen.unload()


def test_florence_refuses_a_task_that_gives_no_caption(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="<OD>"):
        VLMConfig(model="x", family="florence2", prompt="<OD>")
    gen = VLMGenerator(VLMConfig(model=str(model_dirs["florence2"]), prompt="<OD>"))
    with pytest.raises(ModelUnavailableError, match="task tokens"):
        gen.load()  # family auto-detected, then the prompt checked
    assert not gen.loaded
    # chat families take any text, task-token-like or not
    VLMConfig(model="x", family="llava", prompt="<OD>")


def test_empty_batch_and_not_loaded(model_dirs: dict[str, Path]) -> None:
    gen = VLMGenerator(VLMConfig(model=str(model_dirs["llava"])))
    with pytest.raises(GenerationError):
        gen.generate([])
    with pytest.raises(RuntimeError):
        gen.prepare(images(1)[0])
    gen.load()
    assert gen.generate([]) == []
    gen.unload()


# -- families, prompts --------------------------------------------------------------------


def test_family_auto_detection(gens: dict[str, VLMGenerator]) -> None:
    assert {k: g.family.name for k, g in gens.items() if g.family} == {
        "llava": "llava",
        "idefics3": "smolvlm",
        "florence2": "florence2",
        "qwen2_5_vl": "qwen2_5_vl",
    }
    assert gens["florence2"].model_info["family"] == "florence2"
    assert detect_family("llava", "fancyfeast/llama-joycaption-beta-one-hf-llava").name == (
        "joycaption"
    )
    assert detect_family("qwen2_5_vl").name == "qwen2_5_vl"
    assert detect_family(None, "vikhyatk/moondream2").name == "moondream2"
    assert detect_family("bert") is None


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    gen = VLMGenerator(VLMConfig(model=str(tmp_path)))
    with pytest.raises(ModelUnavailableError, match="set family"):
        gen.load()


def test_family_default_prompts(model_dirs: dict[str, Path]) -> None:
    gen = make(model_dirs["florence2"])
    try:
        assert gen.prompt == "<DETAILED_CAPTION>"
        assert len(gen.generate(prepared(gen, 2))) == 2
    finally:
        gen.unload()
    gen = make(model_dirs["llava"], family="joycaption")
    try:
        text = gen.prepare(images(1)[0]).text
        assert "SYSTEM: You are a helpful image captioner." in text
        assert "Write a long descriptive caption" in text
        assert text.rstrip().endswith("ASSISTANT:")
    finally:
        gen.unload()


def test_prompt_variables_are_filled(gens: dict[str, VLMGenerator]) -> None:
    gen = gens["llava"]
    item = ImageInput(Path("/d/x.png"), Image.new("RGB", (8, 8)), {"name": "cat", "folder": "pets"})
    prep = gen.prepare(item)
    assert prep.prompt == "describe cat in pets"
    assert "<image>" in prep.text and "describe cat in pets" in prep.text
    ctx = {"tags": "1girl, solo", "name": "n", "folder": "f"}
    assert render_prompt("Tags: {tags}. {{literal}}", ctx) == "Tags: 1girl, solo. {literal}"


def test_missing_variable_is_a_clear_non_retryable_error(model_dirs: dict[str, Path]) -> None:
    gen = make(model_dirs["llava"], prompt="Use these tags: {tags}")
    try:
        item = ImageInput(Path("/d/x.png"), Image.new("RGB", (8, 8)), {"name": "x", "folder": "d"})
        with pytest.raises(PromptVariableError) as info:
            gen.prepare(item)
        msg = str(info.value)
        assert "{tags}" in msg and "/d/x.png" in msg and "folder, name" in msg
        c = classify(info.value)
        assert c.error_type is ErrorType.GENERATION and c.retryable is False
    finally:
        gen.unload()


@pytest.mark.parametrize("prompt", ["{tag}", "{0}", "{}", "{name.upper}", "{name!r}", "a {b"])
def test_bad_prompt_fields_fail_validation(prompt: str) -> None:
    with pytest.raises(ValidationError):
        VLMConfig(prompt=prompt)


def test_config_defaults_and_limits() -> None:
    cfg = VLMConfig()
    assert (cfg.family, cfg.do_sample, cfg.dtype, cfg.device) == ("auto", False, "auto", "auto")
    assert cfg.quantization == "none" and cfg.trust_remote_code is False
    with pytest.raises(ValidationError):
        VLMConfig(max_new_tokens=8, min_new_tokens=9)
    with pytest.raises(ValidationError):
        VLMConfig(unknown_key=1)
    assert VLMGenerator.weight is WeightClass.HEAVY and VLMGenerator.caption_type == "caption"


def test_sampling_settings_only_when_sampling(model_dirs: dict[str, Path]) -> None:
    greedy = VLMGenerator(VLMConfig(model="x"))._generate_kwargs()
    assert greedy["do_sample"] is False and "temperature" not in greedy
    assert "min_new_tokens" not in greedy
    sampled = VLMGenerator(VLMConfig(do_sample=True, temperature=0.5, top_p=0.8))
    kw = sampled._generate_kwargs()
    assert (kw["do_sample"], kw["temperature"], kw["top_p"]) == (True, 0.5, 0.8)


def test_prepare_shrinks_and_flattens_alpha(gens: dict[str, VLMGenerator]) -> None:
    gen = gens["llava"]
    big = Image.new("RGBA", (3000, 1500), (255, 0, 0, 0))  # fully transparent red
    item = ImageInput(Path("/d/big.png"), big, {"name": "b", "folder": "d"})
    prep = gen.prepare(item)
    assert prep.image.mode == "RGB" and prep.image.size == (1024, 512) == prep.size
    assert prep.image.getpixel((10, 10)) == (255, 255, 255)  # transparency on white
    assert gen.draft_size == 1024 and gen.draft_longer_side  # shrink() bounds the longer side


EXTREME = [(1, 20000), (20000, 1), (3, 2000), (2000, 3), (1, 1)]


@pytest.mark.parametrize("family", ["llava", "idefics3", "florence2"])
def test_extreme_aspect_ratios_are_captioned(gens: dict[str, VLMGenerator], family: str) -> None:
    gen = gens[family]
    items = [
        gen.prepare(
            ImageInput(
                Path(f"/d/{w}x{h}.png"),
                Image.new("RGB", (w, h), (200, 0, 0)),
                {"name": "strip", "folder": "d"},
            )
        )
        for w, h in EXTREME
    ]
    for item in items:
        w, h = item.image.size
        assert max(w, h) <= 20 * min(w, h) and max(w, h) <= gen.max_image_side
    out = gen.generate(items)
    assert len(out) == len(EXTREME) and all(t.strip() for t in out)


def test_thin_strips_get_white_bars_that_image_processors_accept() -> None:
    from transformers import Qwen2VLImageProcessor

    line = Image.new("RGB", (1, 20000), (0, 0, 255))
    small = shrink(line, 1024)
    assert small.size == (52, 1024)  # ceil(1024 / 20) wide, the line in the middle
    assert small.getpixel((25, 500)) == (0, 0, 255) and small.getpixel((0, 500)) == (255,) * 3
    assert shrink(Image.new("RGB", (30000, 2)), 0).size == (30000, 1500)
    assert shrink(Image.new("RGB", (400, 300)), 1024).size == (400, 300)  # normal: as is
    # Qwen2-VL's processor refuses an aspect ratio above 200 (the unpadded strip)
    out = Qwen2VLImageProcessor()(images=[small], return_tensors="pt")
    assert out["pixel_values"].shape[0] > 0


# -- remote code, loading errors, unload --------------------------------------------------


def test_moondream_without_opt_in_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    gen = VLMGenerator(VLMConfig(model="vikhyatk/moondream2"), cache_dir=cache)
    with pytest.raises(ModelUnavailableError, match="trust_remote_code = true") as info:
        gen.load()
    assert not classify(info.value).retryable
    assert not cache.exists()  # refused before any download
    folder = tmp_path / "md"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "moondream1"}')
    with pytest.raises(ModelUnavailableError, match="trust_remote_code"):
        VLMGenerator(VLMConfig(model=str(folder))).load()  # detected from config.json


def test_qwen2_5_vl_image_tokens_and_new_text_only(gens: dict[str, VLMGenerator]) -> None:
    """Qwen2.5-VL's own prompt layout: the image becomes <|vision_start|> image pads
    <|vision_end|> in a chat turn, the processor expands the pad per image patch group,
    and only the new tokens come back."""
    gen = gens["qwen2_5_vl"]
    item = gen.prepare(images(1)[0])
    assert item.text.startswith("<|im_start|>user")
    assert "<|vision_start|><|image_pad|><|vision_end|>describe cat in set" in item.text
    assert item.text.endswith("<|im_start|>assistant\n")
    inputs = gen._processor(text=[item.text], images=[item.image], return_tensors="pt")
    pads = int((inputs["input_ids"] == gen._processor.image_token_id).sum())
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert pads == t * h * w // 4 > 1  # 2x2 patches merged into one token
    (out,) = gen.generate([item])
    assert out and len(out.split()) <= TOKENS and "im_start" not in out and "assistant" not in out


@pytest.fixture(scope="session")
def moondream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.vlmmodels import build_moondream2

    return build_moondream2(tmp_path_factory.mktemp("models") / "tiny-moondream2")


def solid(rgb: tuple[int, int, int], name: str = "x") -> ImageInput:
    return ImageInput(Path(f"/data/set/{name}.png"), Image.new("RGB", (40, 30), rgb), {})


def test_moondream2_captions_through_its_own_code(moondream_dir: Path) -> None:
    """moondream2's path: AutoModelForCausalLM with trust_remote_code (the model class
    comes from the repository's own file via auto_map), no processor, caption() with
    the length from the prompt, max_new_tokens as its max_tokens; the weights are the
    saved ones (the colour word leads)."""
    gen = VLMGenerator(VLMConfig(model=str(moondream_dir), trust_remote_code=True, prompt="long"))
    gen.load()
    try:
        assert gen.family.name == "moondream2" and gen._processor is None
        assert type(gen._model).__name__ == "TinyMoondream"
        assert gen.model_info["family"] == "moondream2"
        red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
        items = [gen.prepare(solid(c)) for c in (red, green, blue)]
        assert [i.text for i in items] == ["long", "long", "long"]  # no chat template
        out = gen.generate(items)
        assert [t.split()[0] for t in out] == ["red", "green", "blue"]
        assert all(len(t.split()) == 8 for t in out)  # "long"
    finally:
        gen.unload()
    for prompt, words in (("short", 2), ("normal", 4)):
        gen = VLMGenerator(
            VLMConfig(model=str(moondream_dir), trust_remote_code=True, prompt=prompt)
        )
        gen.load()
        (text,) = gen.generate([gen.prepare(solid(red))])
        assert text.split()[0] == "red" and len(text.split()) == words
        gen.unload()
    gen = VLMGenerator(
        VLMConfig(model=str(moondream_dir), trust_remote_code=True, max_new_tokens=3)
    )
    gen.load()  # default prompt "normal", capped by max_new_tokens
    (text,) = gen.generate([gen.prepare(solid(blue))])
    assert gen.prompt == "normal" and text.split()[0] == "blue" and len(text.split()) == 3
    gen.unload()


def test_moondream2_answers_a_question(moondream_dir: Path) -> None:
    """Any other prompt is a question for query(); its variables are filled first."""
    gen = VLMGenerator(
        VLMConfig(model=str(moondream_dir), trust_remote_code=True, prompt="What is {name}?")
    )
    gen.load()
    try:
        item = gen.prepare(
            ImageInput(Path("/d/cat.png"), Image.new("RGB", (20, 20), (0, 255, 0)), {"name": "cat"})
        )
        assert item.prompt == "What is cat?"
        (answer,) = gen.generate([item])
        assert answer.split()[0] == "green" and answer.endswith("cat")
    finally:
        gen.unload()


def test_moondream2_local_repo_needs_the_opt_in(moondream_dir: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="trust_remote_code"):
        VLMGenerator(VLMConfig(model=str(moondream_dir))).load()


def test_unload_drops_the_model(model_dirs: dict[str, Path]) -> None:
    gen = make(model_dirs["llava"], prompt=CHAT_PROMPT)
    assert gen.loaded
    gen.generate(prepared(gen, 2))
    model_ref = weakref.ref(gen._model)
    proc_ref = weakref.ref(gen._processor)
    gen.unload()
    gc.collect()
    assert not gen.loaded
    assert model_ref() is None and proc_ref() is None
    assert gen.model_info == {}
    gen.load()  # loads again after an unload
    assert gen.generate(prepared(gen, 1))
    gen.unload()


def test_repo_id_offline_with_empty_cache_is_retryable_download_error(tmp_path: Path) -> None:
    gen = VLMGenerator(VLMConfig(model="HuggingFaceTB/SmolVLM-256M-Instruct"), cache_dir=tmp_path)
    with pytest.raises(ModelDownloadError) as info:
        gen.load()
    c = classify(info.value)
    assert c.error_type is ErrorType.MODEL_DOWNLOAD and c.retryable
    assert "SmolVLM-256M-Instruct" in str(info.value)
    with pytest.raises(ModelDownloadError):
        pull("HuggingFaceTB/SmolVLM-256M-Instruct", None, tmp_path / "hf")


def test_unreachable_or_busy_hub_is_a_network_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection refused (a closed local port) and a 503 with Retry-After, through the
    real snapshot_download: `network`, retryable. Offline stays `model_download`
    (the test above)."""
    unreachable_hub(monkeypatch)
    gen = VLMGenerator(VLMConfig(model="HuggingFaceTB/SmolVLM-256M-Instruct"), cache_dir=tmp_path)
    with pytest.raises(NetworkError) as info:
        gen.load()
    c = classify(info.value)
    assert (c.error_type, c.retryable) == (ErrorType.NETWORK, True)
    assert "SmolVLM-256M-Instruct" in str(info.value)
    with busy_hub(monkeypatch, 503, retry_after="30"), pytest.raises(NetworkError) as info:
        pull("HuggingFaceTB/SmolVLM-256M-Instruct", None, tmp_path / "hf")
    assert info.value.retry_after == 30.0


def test_pull_returns_a_local_folder_and_refuses_a_missing_one(tmp_path: Path) -> None:
    assert pull(str(tmp_path)) == tmp_path
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        pull(str(tmp_path / "nope"))


def test_local_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match=r"config\.json"):
        VLMGenerator(VLMConfig(model=str(tmp_path))).load()


def test_quantization_without_bitsandbytes(model_dirs: dict[str, Path]) -> None:
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    gen = VLMGenerator(VLMConfig(model=str(model_dirs["llava"]), quantization="4bit"))
    with pytest.raises(ModelUnavailableError, match="bitsandbytes"):
        gen.load()
    assert not gen.loaded


def test_cuda_device_without_cuda(model_dirs: dict[str, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    gen = VLMGenerator(VLMConfig(model=str(model_dirs["llava"]), device="cuda"))
    with pytest.raises(ModelUnavailableError, match="CUDA"):
        gen.load()
    auto = make(model_dirs["llava"])
    try:
        assert auto.model_info["device"] == "cpu" and auto.model_info["dtype"] == "float32"
    finally:
        auto.unload()


def test_missing_torch_makes_it_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        vlm_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real(name, *a),
    )
    avail = VLMGenerator.is_available()
    assert not avail.ok and "torch" in avail.reason
    with pytest.raises(ModelUnavailableError, match="torch"):
        VLMGenerator(VLMConfig(model="x")).load()


def test_import_is_cheap_and_registered() -> None:
    code = (
        "import sys, daemon.generators.vlm, daemon.text.vlm, daemon.text.postprocess; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
    found = discover()["vlm"]
    assert found.cls is VLMGenerator and found.availability().ok
