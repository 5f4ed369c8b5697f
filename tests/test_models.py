"""Tests of vidbatch.models.builtin and vidbatch.models.loading: offline random-weight SD pipelines, loading, LoRA, fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from vidbatch.models import builtin as tiny_model
from vidbatch.models import loading as models
from vidbatch.testing import checkpoints
from vidbatch.core.errors import ModelLoadError
from vidbatch.models.loading import LoraSpec, load_pipeline, model_fingerprint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model.make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory) -> Path:
    return checkpoints.make_lora_file(tiny_dir, tmp_path_factory.mktemp("lora") / "lora.safetensors", rank=4, seed=0)


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch, tmp_path):
    # Never touch ~/.cache or the network from a test.
    monkeypatch.setenv("VIDBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------- tiny


def test_make_tiny_model_is_bit_identical_for_a_seed(tmp_path, tiny_dir):
    again = _files(tiny_model.make_tiny_model(tmp_path / "again", seed=0))
    first = _files(tiny_dir)
    assert sorted(again) == sorted(first)
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(first)
    for name in first:
        assert again[name] == first[name], name
    other = _files(tiny_model.make_tiny_model(tmp_path / "seed1", seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != first["unet/diffusion_pytorch_model.safetensors"]
    # No temporary folders are left beside the published ones.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "seed1"]


def test_make_tiny_model_replaces_an_existing_folder(tmp_path):
    out = tiny_model.make_tiny_model(tmp_path / "m", seed=1)
    (out / "stale.txt").write_text("old")
    tiny_model.make_tiny_model(out, seed=0)
    assert not (out / "stale.txt").exists()
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_tiny_model_loads_offline_and_tokenizes(tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), local_files_only=True)
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.num_train_timesteps, sched.clip_sample, sched.set_alpha_to_one, sched.steps_offset) == (
        1000, False, False, 1)
    assert sched.prediction_type == "epsilon"
    assert pipe.vae_scale_factor == 8

    ids = tok("a photo of a cat").input_ids
    vocab_size = pipe.text_encoder.config.vocab_size
    assert len(tok) == vocab_size
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert all(0 <= i < vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # Words outside the corpus still encode (byte fallback), padded to 77 like SD's prompt encoding.
    padded = tok("Zürich, 2024!", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and max(padded) < vocab_size
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id


def test_build_tokenizer_is_deterministic_and_sized(tmp_path):
    a = tiny_model.build_tokenizer(tmp_path / "a")
    tiny_model.build_tokenizer(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # CLIP's layout: specials are the last two ids.
    assert a.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [len(a) - 2, len(a) - 1]
    small = tiny_model.build_tokenizer(tmp_path / "small", vocab_size=600)
    assert len(small) == 600
    assert max(small("a photo of a cat").input_ids) < 600
    with pytest.raises(ValueError):
        tiny_model.build_tokenizer(tmp_path / "tiny", vocab_size=100)


def test_tiny_pipeline_components_run(tiny_dir):
    pipe = load_pipeline(str(tiny_dir))
    # Cross-attention at both UNet resolutions (token merging / PnP need attention blocks there).
    assert all(hasattr(b, "attentions") for b in (*pipe.unet.down_blocks, *pipe.unet.up_blocks))
    ids = pipe.tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        assert emb.shape == (2, 77, 32)
        out = pipe.unet(torch.randn(2, 4, 8, 8), 999, encoder_hidden_states=emb).sample
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
        images = pipe.vae.decode(torch.randn(2, 4, 8, 8) / pipe.vae.config.scaling_factor).sample
        assert images.shape == (2, 3, 64, 64)
        latents = pipe.vae.encode(images).latent_dist.mean
        assert latents.shape == (2, 4, 8, 8)
    assert out.std() > 0 and images.std() > 0


def test_sd15_random_config_matches_sd15_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_model.sd15_random_config()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # The published parameter counts of SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder.
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    assert cfg["text_encoder"]["vocab_size"] == 49408 and cfg["text_encoder"]["hidden_act"] == "quick_gelu"
    assert cfg["scheduler"]["prediction_type"] == "epsilon"


# --------------------------------------------------------------------------------------------------------- loading


def test_load_pipeline_tiny_builds_once_and_reuses_the_cache(monkeypatch, tmp_path):
    from diffusers import DDIMScheduler

    pipe = load_pipeline("tiny")
    cached = tmp_path / "cache" / "models" / tiny_model.TINY_MODEL_VERSION
    weights = cached / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    mtime = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(tiny_model, "_save_pipeline", no_rebuild)
    again = load_pipeline("tiny")
    assert weights.stat().st_mtime_ns == mtime
    assert model_fingerprint(again) == model_fingerprint(pipe)

    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe._progress_bar_config == {"disable": True}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert module.dtype == torch.float32


def test_tiny_model_dir_concurrent_builders_agree(tmp_path, tiny_dir):
    root = tmp_path / "shared"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(tiny_model.tiny_model_dir(root))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    # Exactly one published folder, no temporary leftovers, and it loads.
    assert [p.name for p in (root / "models").iterdir()] == [tiny_model.TINY_MODEL_VERSION]
    assert (results[0] / "vidbatch_model.json").is_file()
    # Concurrent seeded builds did not disturb each other: the winner holds the seed-0 weights.
    assert _files(results[0])["unet/diffusion_pytorch_model.safetensors"] == _files(tiny_dir)[
        "unet/diffusion_pytorch_model.safetensors"]


def test_make_tiny_model_leaves_the_global_generator_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model.make_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_dir_replaces_an_incomplete_folder(tmp_path):
    broken = tmp_path / "models" / tiny_model.TINY_MODEL_VERSION
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")  # a half-copied folder: no completion marker
    out = tiny_model.tiny_model_dir(tmp_path)
    assert out == broken
    assert (out / "vidbatch_model.json").is_file() and (out / "unet").is_dir()


def test_v_prediction_model_keeps_its_prediction_type(tmp_path):
    from diffusers import DDIMScheduler

    model_dir = tiny_model.make_tiny_model(tmp_path / "v", seed=0, prediction_type="v_prediction")
    pipe = load_pipeline(str(model_dir))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.clip_sample is False
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_model.make_tiny_model(tmp_path / "bad", prediction_type="sample")
    assert not (tmp_path / "bad").exists()


def test_load_pipeline_converts_dtype(tiny_dir):
    pipe = load_pipeline(str(tiny_dir), dtype=torch.bfloat16)
    assert {getattr(pipe, n).dtype for n in ("unet", "vae", "text_encoder")} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------------- single file


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_round_trip(tiny_dir, tmp_path, suffix):
    from safetensors import safe_open

    ckpt = checkpoints.make_single_file_checkpoint(tiny_dir, tmp_path / f"tiny{suffix}")
    if suffix == ".ckpt":
        keys = list(torch.load(str(ckpt), weights_only=True)["state_dict"])
    else:
        with safe_open(str(ckpt), framework="pt") as f:
            keys = list(f.keys())
    # The original (CompVis / A1111) layout, not diffusers names.
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "down_blocks")) for k in keys)

    from_file = load_pipeline(str(ckpt), single_file_config=str(tiny_dir))
    from_folder = load_pipeline(str(tiny_dir))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert model_fingerprint(from_file) == model_fingerprint(from_folder)


def test_single_file_without_config_offline_names_the_fix(tiny_dir, tmp_path):
    ckpt = checkpoints.make_single_file_checkpoint(tiny_dir, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="single_file_config") as info:
        load_pipeline(str(ckpt))
    assert str(ckpt) in str(info.value)


# --------------------------------------------------------------------------------------------------------- LoRA


def test_lora_fuses_into_the_weights_at_its_scale(tiny_dir, lora_file):
    from safetensors.torch import load_file

    lora = load_file(str(lora_file))
    assert lora and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert all(v.abs().sum() > 0 for v in lora.values())
    assert any(".attn2.to_k." in k for k in lora) and any(".attn1.to_out.0." in k for k in lora)

    base = load_pipeline(str(tiny_dir))
    full = load_pipeline(str(tiny_dir), loras=[LoraSpec(str(lora_file), 1.0)])
    half = load_pipeline(str(tiny_dir), loras=[LoraSpec(str(lora_file), 0.5)])
    zero = load_pipeline(str(tiny_dir), loras=[LoraSpec(str(lora_file), 0.0)])

    # The fused weight is W + scale * B @ A (alpha = rank, so the LoRA's own scaling is 1).
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    delta = lora[f"unet.{name}.lora_B.weight"] @ lora[f"unet.{name}.lora_A.weight"]
    w = lambda p: p.unet.get_submodule(name).weight  # noqa: E731
    torch.testing.assert_close(w(full), w(base) + delta)
    torch.testing.assert_close(w(half), w(base) + 0.5 * delta)

    assert not torch.allclose(_unet_out(full), _unet_out(base), atol=1e-4)
    torch.testing.assert_close(_unet_out(zero), _unet_out(base))
    # Fused and unloaded: plain layers, no peft wrappers left to slow inference.
    for pipe in (full, zero):
        assert not any("lora" in n for n, _ in pipe.unet.named_modules())
        assert type(pipe.unet.get_submodule(name)) is torch.nn.Linear


def test_fingerprint_tracks_lora_weights_and_scale(tiny_dir, lora_file):
    base = load_pipeline(str(tiny_dir))
    specs1, specs0 = [LoraSpec(str(lora_file), 1.0)], [LoraSpec(str(lora_file), 0.0)]
    full = load_pipeline(str(tiny_dir), loras=specs1)
    zero = load_pipeline(str(tiny_dir), loras=specs0)
    fp_base = model_fingerprint(base)
    fp_full, fp_zero = model_fingerprint(full, specs1), model_fingerprint(zero, specs0)
    assert fp_full != fp_base
    # Scale 0 leaves the weights as they were, but the LoRA list is part of the identity by design.
    assert model_fingerprint(zero) == fp_base
    assert fp_zero != fp_base and fp_zero != fp_full
    assert model_fingerprint(full, specs1) == fp_full


# --------------------------------------------------------------------------------------------------------- errors


def test_missing_path_raises_model_load_error(tmp_path):
    missing = str(tmp_path / "nope" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no such file") as info:
        load_pipeline(missing)
    assert missing in str(info.value)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))  # a folder, but not a diffusers one


def test_unknown_hub_id_offline_raises_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("vidbatch-tests/no-such-model")
    message = str(info.value)
    assert "'vidbatch-tests/no-such-model'" in message and "Fix:" in message
    assert "\n" not in message


def test_unwritable_cache_raises_model_load_error(monkeypatch, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("VIDBATCH_CACHE", str(not_a_dir))
    with pytest.raises(ModelLoadError, match="VIDBATCH_CACHE") as info:
        load_pipeline("tiny")
    assert "'tiny'" in str(info.value)


def test_bad_loras_raise_model_load_error(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load_pipeline(str(tiny_dir), loras=[LoraSpec(str(missing))])
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ModelLoadError, match="garbage.safetensors"):
        load_pipeline(str(tiny_dir), loras=[LoraSpec(str(garbage))])

    # A LoRA for a wider model: right names, wrong shapes.
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{name}.lora_A.weight": torch.ones(4, 320), f"{name}.lora_B.weight": torch.ones(320, 4)}, str(wrong))
    with pytest.raises(ModelLoadError, match="does not match the model") as info:
        load_pipeline(str(tiny_dir), loras=[LoraSpec(str(wrong))])
    assert "wrong.safetensors" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_sensitive(tiny_dir):
    a, b = load_pipeline(str(tiny_dir)), load_pipeline(str(tiny_dir))
    fp = model_fingerprint(a)
    assert fp == model_fingerprint(b)
    assert len(fp) == 32 and int(fp, 16) >= 0

    with torch.no_grad():
        b.vae.decoder.conv_out.bias[0] += 1e-3
    assert model_fingerprint(b) != fp

    b = load_pipeline(str(tiny_dir))
    b.scheduler.register_to_config(steps_offset=0)
    assert model_fingerprint(b) != fp

    half = load_pipeline(str(tiny_dir), dtype=torch.bfloat16)  # bf16 has no numpy dtype: hashed as raw bytes
    assert model_fingerprint(half) not in (fp, "")


def test_fingerprint_and_cache_are_shared_across_processes(tmp_path, lora_file):
    # This process builds the cached tiny model; another process (different hash seed) must reuse it and
    # compute the same fingerprints, with and without a LoRA.
    specs = [LoraSpec(str(lora_file), 0.7)]
    fps = [model_fingerprint(load_pipeline("tiny")), model_fingerprint(load_pipeline("tiny", loras=specs), specs)]
    weights = tmp_path / "cache" / "models" / tiny_model.TINY_MODEL_VERSION / "unet"
    mtime = (weights / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    code = (
        "import sys; from vidbatch.models.loading import LoraSpec, load_pipeline, model_fingerprint as fp;"
        "s = [LoraSpec(sys.argv[1], 0.7)];"
        "print(fp(load_pipeline('tiny'))); print(fp(load_pipeline('tiny', loras=s), s))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(lora_file)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == fps
    assert (weights / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_auto_dtype_is_bfloat16_only_on_cpus_that_multiply_it_natively():
    from vidbatch.models.dtype import auto_dtype, cpu_flags

    amx = cpu_flags("processor\t: 0\nflags\t\t: fpu sse avx512f amx_tile amx_bf16\n")
    plain = cpu_flags("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert auto_dtype(torch.device("cpu"), amx) == torch.bfloat16
    assert auto_dtype(torch.device("cpu"), cpu_flags("flags : avx512_bf16")) == torch.bfloat16
    assert auto_dtype(torch.device("cpu"), plain) == torch.float32
    assert auto_dtype(torch.device("cpu"), cpu_flags("")) == torch.float32
    assert auto_dtype(torch.device("cuda"), plain) == torch.float16
