"""fsdit.encoder against transformers' PyTorch SigLIP: random tiny models saved with `save_pretrained`
(and rewritten the way the hub's files are), loaded through `SigLIPEncoder.from_pretrained`, same inputs.
torch and transformers are test-time references only."""
import json, os, subprocess, sys, time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from fsdit.encoder import (SigLIPEncoder, VisionSpec, CheckpointError, HubUnavailableError, preprocess_siglip,
                           read_vision_config, resize_rule, to_torch, torch_keys)

TOL = 1e-4  # max abs error relative to the output scale (float32)


# ---- fixtures (helpers prefixed siglip_) ----

def siglip_vision_cfg(**kw) -> transformers.SiglipVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.SiglipVisionConfig(**{**base, **kw})


def siglip_torch_vision(cfg, seed=0) -> transformers.SiglipVisionModel:
    "A random SiglipVisionModel with non-trivial layer norms (the default init has scale 1, bias 0)."
    torch.manual_seed(seed)
    m = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'norm' in n: p.add_(0.1 * torch.randn_like(p))
    return m


def siglip_images(n, size, seed=1, channels=3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)).astype(np.float32)


def siglip_torch_out(model, x):
    with torch.no_grad():
        o = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return o.last_hidden_state.numpy(), None if o.pooler_output is None else o.pooler_output.numpy()


def siglip_rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def siglip_assert_parity(enc, model, x):
    (h, p), (h_ref, p_ref) = enc(x), siglip_torch_out(model, x)
    assert h.shape == h_ref.shape and siglip_rel_err(h, h_ref) < TOL, siglip_rel_err(h, h_ref)
    if p_ref is not None:
        assert p.shape == p_ref.shape and siglip_rel_err(p, p_ref) < TOL, siglip_rel_err(p, p_ref)
        assert siglip_rel_err(enc.pooled(x), p_ref) < TOL
    else:
        assert p is None


def siglip_two_tower(vision_cfg, seed=0) -> transformers.SiglipModel:
    "A random two-tower SiglipModel (tiny text tower) with the given vision config."
    text = transformers.SiglipTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8)
    torch.manual_seed(seed)
    m = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision_cfg.to_dict())).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'norm' in n: p.add_(0.1 * torch.randn_like(p))
    return m


# ---- numerical parity on several shapes ----

CONFIGS = [
    dict(),                                                                                   # patch 8, 4x4 grid
    dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, image_size=30, patch_size=4),  # 7x7, odd size: remainder dropped
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8, image_size=28, patch_size=14, hidden_act='gelu'),
    dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=17, patch_size=4, layer_norm_eps=1e-5),
    dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4, vision_use_head=False),
]


def siglip_cfg_id(kw):
    c = siglip_vision_cfg(**kw)
    return f"{c.image_size}px-p{c.patch_size}-L{c.num_hidden_layers}-H{c.num_attention_heads}" + ('' if c.vision_use_head else '-nohead')


@pytest.mark.parametrize('kw', CONFIGS, ids=siglip_cfg_id)
def test_parity_vision_model(tmp_path, kw):
    "transformers-5 SiglipVisionModel layout (no prefix), saved with save_pretrained."
    cfg = siglip_vision_cfg(**kw)
    model = siglip_torch_vision(cfg)
    model.save_pretrained(tmp_path)
    assert not any(k.startswith('vision_model.') for k in load_file(tmp_path / 'model.safetensors'))
    enc = SigLIPEncoder.from_pretrained(tmp_path)
    assert enc.spec == VisionSpec.from_hf(cfg)
    siglip_assert_parity(enc, model, siglip_images(3, cfg.image_size))


def test_parity_two_tower_minimal_config(tmp_path):
    "The hub's shape: one two-tower SiglipModel file, config.json that lists only what differs from the defaults."
    vcfg = siglip_vision_cfg(num_attention_heads=2)
    model = siglip_two_tower(vcfg)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / 'model.safetensors')
    assert any(k.startswith('text_model.') for k in keys) and any(k.startswith('vision_model.') for k in keys)
    defaults = transformers.SiglipVisionConfig().to_dict()
    vmin = {k: v for k, v in vcfg.to_dict().items() if k in VisionSpec.__dataclass_fields__ and v != defaults[k]}
    (tmp_path / 'config.json').write_text(json.dumps({
        'architectures': ['SiglipModel'], 'model_type': 'siglip', 'initializer_factor': 1.0,
        'text_config': {'vocab_size': 64, 'hidden_size': 16, 'intermediate_size': 32, 'num_hidden_layers': 1,
                        'num_attention_heads': 2, 'max_position_embeddings': 8, 'model_type': 'siglip_text_model'},
        'vision_config': {**vmin, 'model_type': 'siglip_vision_model'}}))
    assert 'hidden_act' not in vmin and 'layer_norm_eps' not in vmin
    enc = SigLIPEncoder.from_pretrained(tmp_path)
    siglip_assert_parity(enc, model.vision_model, siglip_images(2, 32))


def test_hub_config_defaults():
    "An (almost) empty two-tower config is SigLIP B/16 at 224 by the library's defaults."
    assert read_vision_config({'model_type': 'siglip', 'text_config': {}, 'vision_config': {}}) == VisionSpec()
    assert read_vision_config({'model_type': 'siglip'}) == VisionSpec()
    assert read_vision_config({'model_type': 'siglip_vision_model', 'patch_size': 14}).patch_size == 14


def test_parity_vision_prefixed_and_sharded(tmp_path):
    "transformers-4 SiglipVisionModel layout (`vision_model.` prefix), and a sharded checkpoint."
    cfg = siglip_vision_cfg()
    model = siglip_torch_vision(cfg, seed=2)
    model.save_pretrained(tmp_path / 'v5')
    sd = load_file(tmp_path / 'v5' / 'model.safetensors')
    (tmp_path / 'v4').mkdir()
    save_file({f'vision_model.{k}': v for k, v in sd.items()}, tmp_path / 'v4' / 'model.safetensors', metadata={'format': 'pt'})
    (tmp_path / 'v4' / 'config.json').write_text((tmp_path / 'v5' / 'config.json').read_text())
    x = siglip_images(2, 32)
    siglip_assert_parity(SigLIPEncoder.from_pretrained(tmp_path / 'v4'), model, x)
    model.save_pretrained(tmp_path / 'sharded', max_shard_size='30KB')
    assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
    assert len(list((tmp_path / 'sharded').glob('model-*.safetensors'))) > 1
    siglip_assert_parity(SigLIPEncoder.from_pretrained(tmp_path / 'sharded'), model, x)


def test_bfloat16_checkpoint(tmp_path):
    "A checkpoint stored in bfloat16 (numpy cannot read it directly) loads to the bf16-rounded weights."
    cfg = siglip_vision_cfg()
    model = siglip_torch_vision(cfg, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    enc = SigLIPEncoder.from_pretrained(tmp_path)
    siglip_assert_parity(enc, model.float(), siglip_images(2, 32))


def test_save_pretrained_round_trip(tmp_path):
    "What SigLIPEncoder.save_pretrained writes, transformers loads, with the same outputs."
    enc = SigLIPEncoder.random(siglip_spec := VisionSpec.from_hf(siglip_vision_cfg()), seed=5)
    enc.save_pretrained(tmp_path)
    model = transformers.SiglipVisionModel.from_pretrained(tmp_path).eval()
    siglip_assert_parity(SigLIPEncoder.from_pretrained(tmp_path), model, siglip_images(2, siglip_spec.image_size))


def test_embed_and_supports(tmp_path):
    cfg = siglip_vision_cfg()
    model = siglip_torch_vision(cfg)
    model.save_pretrained(tmp_path)
    enc = SigLIPEncoder.from_pretrained(tmp_path)
    x = siglip_images(6, 32)
    p_ref = siglip_torch_out(model, x)[1]
    e = np.asarray(enc.embed(x))
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(e, p_ref / np.linalg.norm(p_ref, axis=-1, keepdims=True), atol=1e-4)
    s = np.asarray(enc.encode_supports(x.reshape(2, 3, 32, 32, 3)))
    np.testing.assert_allclose(s, e.reshape(2, 3, -1).mean(1), atol=1e-6)
    assert s.shape == (2, 32) and s.dtype == np.float32


# ---- full-size SigLIP2 B/16 at 224 ----

@pytest.mark.slow
def test_full_size_b16(tmp_path):
    "SigLIP2 B/16 at 224, random weights: same parameter count and output as torch; bfloat16 error bounded."
    cfg = transformers.SiglipVisionConfig()            # the library's defaults are B/16 at 224 (what the hub config leans on)
    model = siglip_torch_vision(cfg)
    model.save_pretrained(tmp_path)
    enc = SigLIPEncoder.from_pretrained(tmp_path)
    n_torch = sum(p.numel() for p in model.parameters())
    n_flax = sum(int(np.prod(v.shape)) for v in __import__('jax').tree.leaves(enc.params))
    assert n_flax == n_torch == 92_884_224, (n_flax, n_torch)
    x = siglip_images(2, 224)
    siglip_assert_parity(enc, model, x)
    e32 = np.asarray(enc.embed(x))
    e16 = np.asarray(SigLIPEncoder(enc.spec, enc.params, 'bfloat16').embed(x))
    dist = np.linalg.norm(e16 - e32, axis=-1)
    assert dist.max() < 0.05, dist              # measured: see the notebook's bfloat16 section


# ---- the offline case, wrong checkpoints, bad images ----

def test_offline_hub_id_fails_fast_and_clearly(tmp_path):
    code = "from fsdit.encoder import SigLIPEncoder; SigLIPEncoder.from_pretrained('google/siglip2-base-patch16-224')"
    t = time.time()
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path)})
    assert time.time() - t < 60
    assert r.returncode != 0 and 'HubUnavailableError' in r.stderr, r.stderr[-2000:]
    msg = r.stderr.strip().splitlines()[-1]
    assert "'google/siglip2-base-patch16-224'" in msg and 'local-dir' in msg and 'directory' in msg, msg


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither a checkpoint directory'):
        SigLIPEncoder.from_pretrained(tmp_path / 'missing')


def test_wrong_kind_clip(tmp_path):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8)
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"expected a SigLIP checkpoint.*found model_type 'clip_vision_model'"):
        SigLIPEncoder.from_pretrained(tmp_path)
    # a CLIP file behind a SigLIP config: the missing tensors are named
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'siglip_vision_model', **{k: getattr(cfg, k) for k in (
        'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'image_size', 'patch_size')}}))
    with pytest.raises(CheckpointError, match='missing'):
        SigLIPEncoder.from_pretrained(tmp_path)


def test_wrong_kind_siglip2_naflex():
    with pytest.raises(CheckpointError, match='NaFlex'):
        read_vision_config({'model_type': 'siglip2'})


def test_missing_tensor_and_wrong_shape(tmp_path):
    cfg = siglip_vision_cfg()
    siglip_torch_vision(cfg).save_pretrained(tmp_path)
    sd = load_file(tmp_path / 'model.safetensors')
    save_file({k: v for k, v in sd.items() if k != 'head.probe'}, tmp_path / 'model.safetensors')
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. \['head\.probe'\]"):
        SigLIPEncoder.from_pretrained(tmp_path)
    save_file(sd, tmp_path / 'model.safetensors')
    c = json.loads((tmp_path / 'config.json').read_text()); c['intermediate_size'] = 96
    (tmp_path / 'config.json').write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match='expected shape'):
        SigLIPEncoder.from_pretrained(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'siglip_vision_model'}))
    (tmp_path / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(CheckpointError, match='no model.safetensors'):
        SigLIPEncoder.from_pretrained(tmp_path)


@pytest.fixture(scope='module')
def siglip_tiny_encoder():
    return SigLIPEncoder.random(VisionSpec.from_hf(siglip_vision_cfg()))


@pytest.mark.parametrize('bad, match', [
    (lambda x: x * 255, r'\[-1, 1\]'),
    (lambda x: (x * 127 + 128).astype(np.uint8), 'preprocess_siglip'),
    (lambda x: x.transpose(0, 3, 1, 2), 'channels'),
    (lambda x: x[0], 'NHWC'),
    (lambda x: x[:, :16, :16], '32x32'),
    (lambda x: np.where(x > 0.5, np.nan, x), r'\[-1, 1\]'),
])
def test_bad_images(siglip_tiny_encoder, bad, match):
    x = siglip_images(2, 32)
    with pytest.raises(ValueError, match=match):
        siglip_tiny_encoder.embed(bad(x))


def test_bad_supports(siglip_tiny_encoder):
    with pytest.raises(ValueError, match=r'\(B, K, H, W, C\)'):
        siglip_tiny_encoder.encode_supports(siglip_images(2, 32))


def test_no_head(tmp_path):
    enc = SigLIPEncoder.random(VisionSpec.from_hf(siglip_vision_cfg(vision_use_head=False)))
    with pytest.raises(ValueError, match='no MAP head'):
        enc.embed(siglip_images(1, 32))


# ---- preprocessing: the processor's rule ----

def test_preprocess_matches_processor():
    from PIL import Image
    proc = transformers.SiglipImageProcessorPil(resample=2)   # the hub's preprocessor_config.json: resample 2 (bilinear)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((480, 640), (50, 37), (224, 224), (225, 223))]
    pils = [Image.fromarray(arrays[0]).convert('L'), Image.fromarray(arrays[1]).convert('RGBA')]
    for ims in (arrays, pils):
        ours = preprocess_siglip(ims)
        ref = np.stack([proc(im, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0) for im in ims])
        assert ours.shape == ref.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    batch = np.stack(arrays[2:3] * 2)
    assert preprocess_siglip(batch).shape == (2, 224, 224, 3)
    assert '224x224' in resize_rule(224) and 'bilinear' in resize_rule(224)


def test_same_rule_as_data():
    "fsdit.data resizes and scales the stored images by the same rule, recorded by the same string."
    data = pytest.importorskip('fsdit.data')
    from PIL import Image
    assert data.resize_rule(224) == resize_rule(224)
    im = np.random.default_rng(2).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    theirs = data.to_unit(np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR))[None])
    np.testing.assert_array_equal(preprocess_siglip(im), theirs)
