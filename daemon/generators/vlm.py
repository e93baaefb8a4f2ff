"""Vision-language captions over ``AutoModelForImageTextToText`` + ``AutoProcessor``.

One generator for several model families with thin per-family settings
(:mod:`daemon.generators.vlm_families`): Florence-2 (task tokens, encoder-decoder),
SmolVLM / Idefics3 (chat template, images as one list per sample), Qwen2.5-VL, LLaVA
(including JoyCaption's ``-hf-llava`` checkpoints), and Moondream2 (code from its model
repository: only with ``trust_remote_code = true``).

Batches are generated in one ``model.generate()`` call with LEFT padding, so every
prompt ends at the same position and the new tokens of all rows start together; only
the new tokens are decoded. ``prepare()`` (decode pool) converts and shrinks the image
and renders the prompt text; ``generate()`` runs the processor and the model.

Importing this module is cheap: torch and transformers are imported in ``load()``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import re
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from PIL import Image
from pydantic import Field, field_validator, model_validator

from daemon.errors import (
    ErrorType,
    GenerationError,
    ModelLoadingError,
    ModelUnavailableError,
    is_out_of_memory,
)
from daemon.generators.base import (
    Availability,
    Generator,
    GeneratorConfig,
    ImageInput,
    WeightClass,
)
from daemon.generators.hub import hub_errors, hub_failure, looks_like_path
from daemon.generators.vlm_families import (
    FAMILIES,
    FAMILY_NAMES,
    FLORENCE_TASKS,
    MOONDREAM_LENGTHS,
    Family,
    detect_family,
    family_named,
    is_task_token,
    task_for,
)

log = structlog.get_logger(__name__)

PROMPT_VARIABLES = ("tags", "name", "folder")
REDUCING_GAP = 2.0
# Longest side : shortest side given to a model; a thinner image gets white bars.
MAX_ASPECT = 20.0
# Weight formats never needed by transformers: other runtimes' files in the same repos.
_IGNORE = [
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "*.gguf",
    "*.msgpack",
    "*.h5",
    "*.tflite",
    "*.ot",
    "*.mlmodel",
    "*.mlpackage/*",
    "coreml/*",
]
_TORCH_PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt"]  # fetched only without safetensors

FamilyName = Literal[
    "auto", "florence2", "smolvlm", "idefics3", "qwen2_5_vl", "qwen2_vl", "llava", "joycaption",
    "moondream2", "moondream",
]  # fmt: skip


class PromptVariableError(GenerationError):
    """The prompt names a variable the image's context does not provide.

    Retrying the same job gives the same context, so it is not retryable."""

    error_type = ErrorType.GENERATION
    retryable = False


def prompt_variables(template: str) -> set[str]:
    """Names of the ``{variables}`` in a prompt; ``{{`` and ``}}`` are literal braces.

    Raises ValueError for positional fields (``{}``, ``{0}``), attribute or index
    access, conversions and format specs, and unbalanced braces.
    """
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt {template!r}: {exc} (write {{{{ and }}}} for braces)") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(
                f"prompt field {{{field}}} is not a plain variable; use "
                f"{', '.join('{' + v + '}' for v in PROMPT_VARIABLES)} "
                "(write {{ and }} for literal braces)"
            )
        names.add(field)
    return names


def render_prompt(template: str, context: Mapping[str, str], *, where: str = "") -> str:
    """Fill ``{tags}``, ``{name}``, ``{folder}`` from an image's context.

    A variable the context lacks raises :class:`PromptVariableError` naming it."""
    wanted = prompt_variables(template)
    missing = sorted(wanted - set(context))
    if missing:
        have = ", ".join(sorted(context)) or "nothing"
        raise PromptVariableError(
            f"prompt variable{'s' if len(missing) > 1 else ''} "
            f"{', '.join('{' + m + '}' for m in missing)} has no value"
            f"{' for ' + where if where else ''} (the image context provides {have})"
        )
    return template.format_map({k: str(context[k]) for k in wanted})


class VLMConfig(GeneratorConfig):
    """Settings of ``[generators.vlm]``."""

    model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"  # hub repo id or a local folder
    family: FamilyName = "auto"  # auto = from config.json's model_type
    revision: str | None = None
    # None = the family's default; may use {tags} {name} {folder}. Florence-2 takes a
    # task token (<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>); free text is
    # sent to it as <DETAILED_CAPTION> (logged at load).
    prompt: str | None = None
    system_prompt: str | None = None  # chat families; None = the family's default (if any)
    max_new_tokens: int = Field(128, ge=1, le=8192)
    min_new_tokens: int | None = Field(None, ge=0, le=8192)
    do_sample: bool = False  # greedy (deterministic) unless true
    temperature: float = Field(0.7, gt=0.0, le=5.0)  # only when do_sample
    top_p: float = Field(0.9, gt=0.0, le=1.0)  # only when do_sample
    num_beams: int = Field(1, ge=1, le=16)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16/fp16 on GPU
    device: str = "auto"  # auto = cuda if available, else cpu; or "cpu", "cuda", "cuda:1"
    quantization: Literal["none", "4bit", "8bit"] = "none"  # needs bitsandbytes
    trust_remote_code: bool = False  # run code from the model repository (Moondream2)
    max_image_side: int | None = Field(None, ge=0, le=32_768)  # None: family default; 0: as is

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("prompt is empty; leave it out for the family's default")
        unknown = sorted(prompt_variables(v) - set(PROMPT_VARIABLES))
        if unknown:
            raise ValueError(
                f"unknown prompt variable(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"known: {', '.join('{' + k + '}' for k in PROMPT_VARIABLES)}"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VLMConfig:
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens is larger than max_new_tokens")
        if self.family != "auto":
            check_prompt_for_family(self.prompt, family_named(self.family), ValueError)
        return self


def check_prompt_for_family(
    prompt: str | None, family: Family, error: type[Exception] = ModelUnavailableError
) -> None:
    """Refuse a task token the family does not caption with (Florence-2's ``<OD>``
    gives boxes, not a caption). Free text is fine: :func:`task_for` maps it."""
    if prompt is None or not family.task_prompts or prompt.strip() in family.task_prompts:
        return
    if is_task_token(prompt):
        raise error(
            f"{family.name} captions with the task tokens "
            f"{', '.join(family.task_prompts)} (or free text, sent as "
            f"{family.free_text_task}); {prompt.strip()!r} is not one of them"
        )


# -- model files ----------------------------------------------------------------------


def pull(model: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """Download a hub repository's transformers files into ``cache_dir`` (normally
    ``<cache_dir>/hf``) and return the snapshot folder; a local folder is returned as is.

    Other runtimes' weights (ONNX, GGUF, ...) are skipped, and PyTorch pickles are
    fetched only when the repository has no safetensors. Failures are classified by
    exception type (:func:`~daemon.generators.hub.hub_failure`): not cached while
    offline or other download trouble -> ModelDownloadError, the hub unreachable ->
    NetworkError (both retryable); no such repository, revision or access ->
    ModelUnavailableError.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if looks_like_path(model) or local.exists():
        raise ModelUnavailableError(f"model folder {local} does not exist")
    errs = hub_errors(model)
    from huggingface_hub import snapshot_download

    where = f"{model}{'@' + revision if revision else ''}"

    def fetch(ignore: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id=model,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                ignore_patterns=ignore,
            )
        )

    try:
        folder = fetch(_IGNORE + _TORCH_PICKLES)
        if not any(folder.glob("*.safetensors")) and (folder / "config.json").is_file():
            folder = fetch(_IGNORE)  # an older repository with PyTorch pickles only
    except Exception as exc:
        failure = hub_failure(exc, errs)
        if failure is None:
            raise
        raise failure.error(
            where,
            offline_hint="; run `captiond models pull` with network, or point model at a "
            "local folder",
        ) from exc
    return folder


def read_model_type(folder: Path) -> str | None:
    """``model_type`` from a checkpoint's ``config.json``."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelUnavailableError(f"model folder {folder} has no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read {path}: {exc}") from exc
    mt = data.get("model_type") if isinstance(data, dict) else None
    return mt if isinstance(mt, str) else None


# -- the generator ----------------------------------------------------------------------


@dataclass(slots=True)
class VLMItem:
    """One prepared image: RGB, shrunk, with its rendered prompt text."""

    image: Image.Image
    text: str
    prompt: str  # the filled user prompt (for Florence-2: the task token)
    size: tuple[int, int]  # width, height given to the model


def _to_rgb(image: Image.Image) -> Image.Image:
    img = image
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """RGB (transparency on white), longer side at most ``max_side`` (0 = as is), and
    no thinner than 1:``MAX_ASPECT``: a thinner image is centred between white bars
    (as the WD tagger pads to a square). Image processors choke on a 1x20000 strip:
    Qwen2-VL's refuses an aspect ratio above 200, CLIP's scales the short side up to
    336 px and the long side with it."""
    img = _to_rgb(image)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
    return pad_to_aspect(img, MAX_ASPECT)


def pad_to_aspect(img: Image.Image, max_aspect: float) -> Image.Image:
    """``img`` centred on white so that its longer side is at most ``max_aspect``
    times its shorter side (unchanged when it already is)."""
    w, h = img.size
    long, short = max(w, h), min(w, h)
    if long <= max_aspect * short:
        return img
    need = math.ceil(long / max_aspect)
    size = (need, h) if w < h else (w, need)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


class VLMGenerator(Generator):
    name = "vlm"
    caption_type = "caption"
    description = (
        "Prose captions from vision-language models (Florence-2, SmolVLM/Idefics3, "
        "Qwen2.5-VL, LLaVA/JoyCaption, Moondream2) on transformers"
    )
    version = "1"
    weight = WeightClass.HEAVY
    config_model = VLMConfig

    config: VLMConfig

    def __init__(self, config: VLMConfig | None = None, *, cache_dir: Path | None = None):
        super().__init__(config, cache_dir=cache_dir)
        self._model: Any = None
        self._processor: Any = None
        self._family: Family | None = None
        self._folder: Path | None = None
        self._device: Any = None
        self._dtype: Any = None

    @classmethod
    def is_available(cls) -> Availability:
        for module in ("torch", "transformers"):
            try:
                if importlib.util.find_spec(module) is None:
                    return Availability(
                        False, f"{module} is not installed (pip install 'captiond[vlm]')"
                    )
            except (ImportError, ValueError) as exc:
                return Availability(False, f"{module} cannot be found: {exc}")
        return Availability(True)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def family(self) -> Family | None:
        """The family in use (after load(), or when configured explicitly)."""
        if self._family is not None:
            return self._family
        return None if self.config.family == "auto" else family_named(self.config.family)

    @property
    def prompt(self) -> str:
        """The prompt the model is given: the configured one or the family's default;
        for Florence-2, free text becomes its task token (:func:`task_for`)."""
        fam = self.family
        if self.config.prompt is not None:
            task = task_for(fam, self.config.prompt) if fam is not None else None
            return task or self.config.prompt
        return fam.default_prompt if fam is not None else FAMILIES["llava"].default_prompt

    @property
    def context_keys(self) -> frozenset[str]:
        return frozenset(prompt_variables(self.prompt) - {"name", "folder"})

    @property
    def max_image_side(self) -> int:
        if self.config.max_image_side is not None:
            return self.config.max_image_side
        fam = self.family
        return fam.max_image_side if fam is not None else 1024

    @property
    def draft_size(self) -> int | None:
        return self.max_image_side or None

    @property
    def draft_longer_side(self) -> bool:
        return True  # shrink() bounds the longer side

    @property
    def model_info(self) -> dict[str, Any]:
        if not self.loaded or self._family is None:
            return {}
        return {
            "model": self.config.model,
            "revision": self.config.revision,
            "files": str(self._folder),
            "family": self._family.name,
            "device": str(self._device),
            "dtype": str(self._dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
            "prompt": self.prompt,
        }

    # -- loading --------------------------------------------------------------------

    def _refuse_remote_code(self, family: Family) -> None:
        if family.remote_code and not self.config.trust_remote_code:
            raise ModelUnavailableError(
                f"{self.config.model} ({family.name}) runs Python code from its model "
                "repository, which captiond does not do unless you opt in for this model: "
                "set trust_remote_code = true in [generators.vlm] (and pin revision)"
            )

    def fetch(self) -> str:
        return str(self._resolve_folder())

    def _resolve_folder(self) -> Path:
        cache = self.cache_dir / "hf" if self.cache_dir is not None else None
        return pull(self.config.model.strip(), self.config.revision, cache)

    def _device_dtype(self, torch: Any) -> tuple[Any, Any]:
        want = self.config.device.strip().lower()
        cuda = torch.cuda.is_available()
        if want == "auto":
            device = torch.device("cuda" if cuda else "cpu")
        else:
            try:
                device = torch.device(want)
            except (RuntimeError, ValueError) as exc:
                raise ModelUnavailableError(f"device {want!r} is not a torch device") from exc
            if device.type == "cuda" and not cuda:
                raise ModelUnavailableError(f"device {want!r} asked for but CUDA is not available")
        if self.config.dtype != "auto":
            dtype = getattr(torch, self.config.dtype)
        elif device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        return device, dtype

    def _quantization(self, dtype: Any) -> dict[str, Any]:
        q = self.config.quantization
        if q == "none":
            return {}
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelUnavailableError(
                f"quantization = {q!r} needs bitsandbytes, which is not installed "
                "(pip install bitsandbytes), or set quantization = 'none'"
            )
        from transformers import BitsAndBytesConfig

        if q == "4bit":
            cfg = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
            )
        else:
            cfg = BitsAndBytesConfig(load_in_8bit=True)
        return {"quantization_config": cfg, "device_map": str(self._device)}

    def load(self) -> None:
        if self.loaded:
            return
        avail = self.is_available()
        if not avail.ok:
            raise ModelUnavailableError(avail.reason)
        cfg = self.config
        hint = self.family or detect_family(None, cfg.model)
        if hint is not None:
            self._refuse_remote_code(hint)  # before downloading anything
        folder = self._resolve_folder()
        model_type = read_model_type(folder)
        family = self.family or detect_family(model_type, cfg.model)
        if family is None:
            raise ModelUnavailableError(
                f"cannot tell the family of {cfg.model} (model_type {model_type!r}); set "
                f"family to one of {', '.join(n for n in FAMILY_NAMES if n != 'auto')}"
            )
        self._refuse_remote_code(family)
        check_prompt_for_family(cfg.prompt, family)
        task = task_for(family, cfg.prompt) if cfg.prompt is not None else None
        if task is not None and task != cfg.prompt.strip():
            log.info(
                "vlm_prompt_mapped_to_task",
                model=cfg.model,
                family=family.name,
                prompt=cfg.prompt,
                task=task,
                why=f"{family.name} takes a task token, not free text",
            )

        try:
            import torch
            import transformers
        except ImportError as exc:
            raise ModelUnavailableError(f"cannot import torch/transformers: {exc}") from exc
        device, dtype = self._device_dtype(torch)
        self._device, self._dtype = device, dtype
        extra = self._quantization(dtype)
        trust = cfg.trust_remote_code
        try:
            if family.name == "moondream2":
                processor = None
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, trust_remote_code=True, dtype=dtype, **extra
                )
            else:
                processor = transformers.AutoProcessor.from_pretrained(
                    folder, trust_remote_code=trust
                )
                model = transformers.AutoModelForImageTextToText.from_pretrained(
                    folder, trust_remote_code=trust, dtype=dtype, **extra
                )
        except ImportError as exc:  # e.g. torchvision for Qwen's video processor
            raise ModelUnavailableError(
                f"{family.name} needs a missing package: {type(exc).__name__}: {exc}"
            ) from exc
        except Exception as exc:
            if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                raise
            raise ModelLoadingError(
                f"transformers cannot load {folder}: {type(exc).__name__}: {exc}"
            ) from exc
        if not extra:
            model.to(device)
        model.eval()
        if processor is not None:
            tok = getattr(processor, "tokenizer", None)
            if tok is None:
                raise ModelUnavailableError(f"the processor of {cfg.model} has no tokenizer")
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            if family.chat and not (
                getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
            ):
                raise ModelUnavailableError(
                    f"{cfg.model} has no chat template; {family.name} prompts need one"
                )
        self._family = family
        self._folder = folder
        self._processor = processor
        self._model = model

    def unload(self) -> None:
        self._model = None
        self._processor = None
        self._family = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- inference ------------------------------------------------------------------

    def render_text(self, prompt: str) -> str:
        """The processor text for one image: the chat-rendered prompt, or the task token."""
        fam = self._family
        if fam is None or not fam.chat:
            return prompt
        system = self.config.system_prompt
        if system is None:
            system = fam.system_prompt
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        )
        return self._processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def prepare(self, item: ImageInput) -> VLMItem:
        """Image to RGB, shrunk to ``max_image_side``; prompt variables filled and the
        chat text rendered. Runs in the decode pool."""
        if not self.loaded:
            raise RuntimeError("vlm: prepare() called before load()")
        prompt = render_prompt(self.prompt, item.context, where=str(item.path))
        image = shrink(item.image, self.max_image_side)
        return VLMItem(image, self.render_text(prompt), prompt.strip(), image.size)

    def _generate_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kw: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "do_sample": cfg.do_sample,
            "num_beams": cfg.num_beams,
        }
        if cfg.min_new_tokens:
            kw["min_new_tokens"] = cfg.min_new_tokens
        if cfg.do_sample:
            kw["temperature"] = cfg.temperature
            kw["top_p"] = cfg.top_p
        tok = getattr(self._processor, "tokenizer", None)
        if tok is not None and tok.pad_token_id is not None:
            kw["pad_token_id"] = tok.pad_token_id
        return kw

    def generate(self, batch: Sequence[VLMItem]) -> list[str]:
        model, processor, fam = self._model, self._processor, self._family
        if model is None or fam is None:
            raise GenerationError("vlm is not loaded")
        if not batch:
            return []
        try:
            if fam.name == "moondream2":
                return [self._moondream(model, item) for item in batch]
            return self._generate_batch(model, processor, fam, batch)
        except GenerationError:
            raise
        except Exception as exc:
            if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                raise  # the worker halves the batch
            raise GenerationError(
                f"{fam.name} generation failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _generate_batch(
        self, model: Any, processor: Any, fam: Family, batch: Sequence[VLMItem]
    ) -> list[str]:
        import torch

        images: list[Any] = (
            [[b.image] for b in batch] if fam.nested_images else [b.image for b in batch]
        )
        inputs = processor(
            text=[b.text for b in batch], images=images, padding=True, return_tensors="pt"
        )
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                if torch.is_floating_point(value):
                    inputs[key] = value.to(self._device, dtype=self._dtype)
                else:
                    inputs[key] = value.to(self._device)
        with torch.inference_mode():
            out = model.generate(**inputs, **self._generate_kwargs())
        if getattr(model.config, "is_encoder_decoder", False):
            return [
                self._florence_text(processor, row, b) for row, b in zip(out, batch, strict=True)
            ]
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = processor.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _florence_text(self, processor: Any, row: Any, item: VLMItem) -> str:
        """Florence-2: the task's post-processing, then no special or location tokens."""
        tok = processor.tokenizer
        ids = [int(i) for i in row.tolist() if int(i) != tok.pad_token_id]
        raw = tok.decode(ids, skip_special_tokens=False)
        text = raw
        post = getattr(processor, "post_process_generation", None)
        if post is not None and item.prompt in FLORENCE_TASKS:
            try:
                parsed = post(raw, task=item.prompt, image_size=item.size)
                value = parsed.get(item.prompt) if isinstance(parsed, dict) else None
                if isinstance(value, str):
                    text = value
            except ValueError:  # a processor without the pure_text parser configured
                text = tok.decode(ids, skip_special_tokens=True)
        return strip_task_tokens(text, tok.all_special_tokens)

    def _moondream(self, model: Any, item: VLMItem) -> str:
        settings = {"max_tokens": self.config.max_new_tokens}
        if item.prompt in MOONDREAM_LENGTHS:
            result = model.caption(item.image, length=item.prompt, settings=settings)
            return str(result["caption"]).strip()
        return str(model.query(item.image, item.prompt, settings=settings)["answer"]).strip()


_TASK_TOKEN = re.compile(r"</?s>|<pad>|<loc_\d+>|<(?:[A-Z]+_)*[A-Z]+>")


def strip_task_tokens(text: str, specials: Sequence[str] = ()) -> str:
    """Remove special tokens, ``<loc_N>`` and ``<TASK>`` tokens; collapse whitespace."""
    for tok in specials:
        if tok:
            text = text.replace(tok, " ")
    return " ".join(_TASK_TOKEN.sub(" ", text).split())
