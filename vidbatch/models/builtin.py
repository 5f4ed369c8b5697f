"""Stable-Diffusion-architecture pipelines with random weights, built offline.

No pretrained weights can be downloaded where vidbatch is developed and tested, so everything that needs
"a Stable Diffusion model" uses one of these:

* ``tiny``: SD's architecture shrunk to about 1.9 M parameters (UNet blocks (32, 64) with
  cross-attention at both resolutions, a 4-block VAE with SD's 8x downscale, a 5-layer CLIP text encoder of
  width 32, SD's DDIM scheduler). It builds and reloads in well under a second and lets the whole editing
  engine run end to end on a CPU.
* ``sd15-random``: the exact component configs of Stable Diffusion 1.5 (about 1.07 B parameters) with random
  weights, for timing and memory measurements at full size.

The CLIP tokenizer's vocabulary is not shipped by transformers or diffusers, so :func:`build_tokenizer` writes a
small byte-level BPE vocabulary of our own, learned deterministically from a built-in word list.

Folders are written to a temporary sibling and renamed into place, so a concurrent reader never sees a
half-written model.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TINY_MODEL_VERSION = "tiny-v1"
SD15_RANDOM_VERSION = "sd15-random-v1"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Number of ids that exist before any merge: 256 byte symbols, their 256 "</w>" (end-of-word) forms,
# and the two special tokens.
_BASE_VOCAB = 2 * 256 + 2
_DEFAULT_MAX_MERGES = 400
_SEEDED_INIT_LOCK = threading.Lock()

# The corpus the BPE merges are learned from: common English words, roughly most frequent first, with a bias
# towards words that appear in image/video editing prompts. Its only job is to give the tokenizer realistic
# multi-character tokens; anything outside it still encodes, byte by byte.
_CORPUS_WORDS = """
the of and a to in is you that it he was for on are as with his they i at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up other
about out many then them these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who oil its now find long down day did get come
made may part photo picture image painting drawing sketch style video frame portrait landscape cat dog man
woman person girl boy child car tree house city street road forest mountain river lake sea ocean beach sky
cloud sun moon star night light dark red green blue yellow orange purple pink black white gray brown gold
silver color colorful bright snow rain winter summer spring autumn fire flower garden grass field horse bird
fish bear lion tiger wolf fox rabbit robot anime cartoon pixel watercolor oil van gogh cyberpunk steampunk
fantasy realistic detailed high quality best beautiful ugly blurry low res resolution cinematic lighting
render digital art artist studio wearing dress shirt hat jacket glasses smiling running walking dancing
playing sitting standing flying swimming jumping old young small big little large tall happy sad
""".split()
_CORPUS_WORDS = tuple(dict.fromkeys(_CORPUS_WORDS))  # drop repeats, keep order


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map (the one `ByteLevel` uses).

    Printable latin-1 bytes map to themselves; the others (whitespace, control characters) are shifted to
    code points 256+ so that every byte has a visible, non-whitespace symbol. The dict is ordered the way CLIP
    orders its base vocabulary: printable bytes first, then the shifted ones.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.lru_cache(maxsize=8)
def _learn_merges(words: tuple[str, ...], max_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn up to `max_merges` BPE merges from `words` (CLIP style: the last symbol of a word carries "</w>").

    Word frequency is given by position (earlier words count more) so common words become single tokens
    first. Ties are broken by the pair's text, which makes the result fully deterministic.
    """
    byte_map = _bytes_to_unicode()
    freq: Counter[tuple[str, ...]] = Counter()
    for rank, word in enumerate(words):
        symbols = [byte_map[b] for b in word.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        freq[tuple(symbols)] += len(words) - rank
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in freq.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in freq.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        freq = merged
    return tuple(merges)


def _tokenizer_files(vocab_size: int | None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary (token -> id) and merge list of our CLIP-style tokenizer.

    Layout mirrors CLIP's: byte symbols, their "</w>" forms, merged tokens in merge order, then
    <|startoftext|> and <|endoftext|> as the last two ids (so the EOS id is the largest, as in CLIP).
    """
    if vocab_size is None:
        merges = _learn_merges(_CORPUS_WORDS, _DEFAULT_MAX_MERGES)
    else:
        if vocab_size < _BASE_VOCAB:
            raise ValueError(f"vocab_size must be at least {_BASE_VOCAB} (bytes, their </w> forms, 2 specials)")
        merges = _learn_merges(_CORPUS_WORDS, vocab_size - _BASE_VOCAB)
        if len(merges) != vocab_size - _BASE_VOCAB:
            raise ValueError(
                f"vocab_size {vocab_size} needs {vocab_size - _BASE_VOCAB} merges but the built-in corpus "
                f"yields only {len(merges)}; use at most {_BASE_VOCAB + len(merges)}"
            )
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        # A merge can recreate an existing symbol only in degenerate corpora; keep the first id.
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(out_dir: str | Path, vocab_size: int | None = None) -> "CLIPTokenizer":
    """Write a small CLIP-style byte-level BPE tokenizer to `out_dir` and load it back.

    Files: vocab.json, merges.txt, tokenizer_config.json (model_max_length 77), byte-identical on every call.
    `vocab_size=None` uses every merge the built-in corpus yields (up to 400, about 900 ids in all).

    Returns:
        a `transformers.CLIPTokenizer` loaded offline from `out_dir`.
    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_files(vocab_size)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    tok_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    return CLIPTokenizer.from_pretrained(str(out_dir))


# ---------------------------------------------------------------------------------------------------------
# Component configs


def _scheduler_config(prediction_type: str) -> dict[str, Any]:
    """Stable Diffusion's DDIM settings (SD 1.x: epsilon; SD 2.x-768: v_prediction)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict[str, dict[str, Any]]:
    """Component configs of the tiny pipeline (SD's block structure; UNet 1.5 M, VAE 0.25 M, text 66 k params).

    Cross-attention sits at both UNet resolutions and the mid block, so every code path that patches SD's
    self-/cross-attention (token merging, PnP, extended attention) has blocks to act on. The VAE has 4 blocks
    so its downscale is SD's 8x (64x64 images <-> 8x8 latents).
    """
    return {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            attention_head_dim=2,  # diffusers' name; really the number of heads
            cross_attention_dim=32,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        ),
    }


def sd15_random_config() -> dict[str, dict[str, Any]]:
    """The exact component configs of Stable Diffusion 1.5 (UNet ~860 M, VAE ~84 M, CLIP ViT-L/14 text ~123 M).

    Keys: "unet" (UNet2DConditionModel kwargs), "vae" (AutoencoderKL kwargs), "text_encoder" (CLIPTextConfig
    kwargs), "scheduler" (DDIMScheduler kwargs). The text config keeps SD 1.5's legacy eos_token_id=2, which
    makes CLIP pool at the largest input id; our tokenizer puts <|endoftext|> last, as CLIP does, so pooling
    still lands on the EOS token.
    """
    return {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=768,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        "scheduler": _scheduler_config("epsilon"),
    }


# ---------------------------------------------------------------------------------------------------------
# Building and caching


def _atomic_publish(tmp_dir: Path, out_dir: Path, *, replace: bool) -> Path:
    """Move a fully written `tmp_dir` to `out_dir` (same filesystem, so the rename is atomic).

    With `replace=False` an existing `out_dir` wins (another process finished first) and `tmp_dir` is dropped.
    With `replace=True` the old folder is moved aside first (a reader may find no folder for the instant
    between the two renames, never a half-written one).
    """
    try:
        os.rename(tmp_dir, out_dir)
        return out_dir
    except OSError:
        if not out_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    if not replace:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return out_dir
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, trash / "old")
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
    return out_dir


def _save_pipeline(
    tmp_dir: Path,
    configs: dict[str, dict[str, Any]],
    *,
    seed: int,
    dtype: torch.dtype,
    prediction_type: str,
    marker: dict[str, Any],
) -> None:
    """Instantiate random components under `torch.manual_seed(seed)` and save a diffusers folder in `tmp_dir`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tmp_dir / "_tokenizer_build")
    # Same order of construction every time: the parameters come out of one seeded stream of torch's global
    # generator. The lock keeps two threads of one process from interleaving their draws; fork_rng gives the
    # caller its generator state back.
    with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler(**_scheduler_config(prediction_type))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        for model in (unet, vae, text_encoder):
            # nn.Module.to directly: diffusers' override warns about fp32-only modules even when there are none.
            torch.nn.Module.to(model, dtype=dtype)
    pipe.save_pretrained(str(tmp_dir), safe_serialization=True)
    # transformers writes tokenizer.json etc. (not guaranteed byte-stable across versions); keep only our
    # deterministic vocab.json / merges.txt / tokenizer_config.json, which load the same tokenizer.
    shutil.rmtree(tmp_dir / "tokenizer")
    os.rename(tmp_dir / "_tokenizer_build", tmp_dir / "tokenizer")
    (tmp_dir / "vidbatch_model.json").write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_folder_atomically(out_dir: str | Path, build_fn, *, replace: bool) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        build_fn(tmp_dir)
        # mkdtemp creates the folder private (0700); the published model is an ordinary readable folder.
        os.chmod(tmp_dir, 0o755)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return _atomic_publish(tmp_dir, out_dir, replace=replace)


def _tiny_configs() -> dict[str, dict[str, Any]]:
    vocab, _ = _tokenizer_files(None)
    return tiny_config(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN])


def _tiny_builder(seed: int, prediction_type: str):
    """A function that writes the tiny model into an empty temporary folder."""
    _scheduler_config(prediction_type)  # validate before doing any work
    marker = {"version": TINY_MODEL_VERSION, "seed": seed, "prediction_type": prediction_type}

    def build(tmp_dir: Path) -> None:
        _save_pipeline(
            tmp_dir, _tiny_configs(), seed=seed, dtype=torch.float32, prediction_type=prediction_type, marker=marker
        )

    return build


def _sd15_builder(seed: int, dtype: torch.dtype):
    """A function that writes the SD-1.5-architecture random model into an empty temporary folder."""
    configs = sd15_random_config()
    marker = {"version": SD15_RANDOM_VERSION, "seed": seed, "dtype": str(dtype).removeprefix("torch.")}

    def build(tmp_dir: Path) -> None:
        _save_pipeline(
            tmp_dir, configs, seed=seed, dtype=dtype, prediction_type=configs["scheduler"]["prediction_type"],
            marker=marker,
        )

    return build


def make_tiny_model(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write the tiny random-weight StableDiffusionPipeline folder to `out_dir` (replacing one already there).

    Same `seed` -> bit-identical safetensors files. `prediction_type="v_prediction"` gives an SD-2.x-like model.
    Loads offline with `StableDiffusionPipeline.from_pretrained(out_dir)`.

    Returns:
        `out_dir` as a Path.
    """
    return build_folder_atomically(out_dir, _tiny_builder(seed, prediction_type), replace=True)


def make_sd15_random(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder with SD 1.5's exact architecture and random weights.

    Parameters are initialised in float32 (plain CPU init: about 4 GB of RAM and tens of seconds) and saved in
    `dtype`. Tokenizer: our small one; its ids are all < 49408, which is all the text encoder needs.
    """
    return build_folder_atomically(out_dir, _sd15_builder(seed, dtype), replace=True)


def default_cache_root() -> Path:
    """vidbatch's cache folder: $VIDBATCH_CACHE, else ~/.cache/vidbatch."""
    env = os.environ.get("VIDBATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vidbatch"


def _is_complete(model_dir: Path) -> bool:
    # The marker is written last, inside the temporary folder, before the rename.
    return (model_dir / "model_index.json").is_file() and (model_dir / "vidbatch_model.json").is_file()


def _cached_build(out_dir: Path, build_fn) -> Path:
    if _is_complete(out_dir):
        return out_dir
    if out_dir.exists():
        # Not ours to trust (an interrupted copy, a stray folder): rebuild beside it and swap.
        return build_folder_atomically(out_dir, build_fn, replace=True)
    return build_folder_atomically(out_dir, build_fn, replace=False)


def tiny_model_dir(cache_root: Path | None = None) -> Path:
    """The cached tiny model folder (<cache>/models/tiny-v1, seed 0, epsilon), built on first use.

    `cache_root` defaults to $VIDBATCH_CACHE, else ~/.cache/vidbatch. Safe when several processes call it at
    once: each builds into its own temporary folder and renames it into place; a process that loses the rename
    uses the winner's folder (identical bytes anyway).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return _cached_build(root / "models" / TINY_MODEL_VERSION, _tiny_builder(0, "epsilon"))


def sd15_random_dir(cache_root: Path | None = None) -> Path:
    """The cached SD-1.5-architecture random model folder (<cache>/models/sd15-random-v1, fp16), built once."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return _cached_build(root / "models" / SD15_RANDOM_VERSION, _sd15_builder(0, torch.float16))
