r"""Converts the official DINOv2 ViT-L/14 checkpoint to a pickle-free `.npz`.

  python -m onestep_bench.evaluators.convert_dinov2 \
      --src dinov2-large/model.safetensors \
      --dst ~/.cache/onestep_bench/dinov2_vitl14.npz

Getting the source (on a machine with internet; nothing is downloaded at run
time): the Hugging Face copy of the official weights,
https://huggingface.co/facebook/dinov2-large/resolve/main/model.safetensors
(1.2 GB; `huggingface-cli download facebook/dinov2-large model.safetensors
config.json --local-dir dinov2-large`). It is read with
`safetensors.numpy.load_file` (no pickle, no torch). The `config.json` beside
it, when present, gives `num_attention_heads`; else `--num_heads`, else
width / 64 (every released DINOv2).

The torch.hub checkpoint `dinov2_vitl14_pretrain.pth`
(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth)
is accepted too, read with `torch.load(weights_only=True)` (the `[parity]`
extra installs torch); the two hold the same tensors under different names.

Both key layouts are mapped to `dinov2.param_shapes`:
  HF (transformers `Dinov2Model`, optional `dinov2.` prefix)
    embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
    encoder.layer.<i>.{norm1, norm2, layer_scale1.lambda1, layer_scale2.
    lambda1, attention.attention.{query,key,value} | attention.{q,k,v}_proj,
    attention.output.dense | attention.o_proj, mlp.fc1, mlp.fc2}, layernorm
  hub (`DinoVisionTransformer`)
    cls_token, pos_embed, patch_embed.proj, blocks.<i>.{norm1, norm2,
    ls1.gamma, ls2.gamma, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}, norm
Linear weights [out, in] become kernels [in, out]; q, k, v are concatenated
into one qkv kernel; the patch conv [D, 3, p, p] becomes a [p * p * 3, D]
matrix; `mask_token` (training only) is dropped. Register tokens and SwiGLU
MLPs (ViT-g) are refused. The output records the source's file name and
sha256; rows carry the output's sha256 (`feature_weights`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onestep_bench.evaluators import dinov2, weights_io


def read_state_dict(src: str) -> dict[str, np.ndarray]:
  """Arrays of a `.safetensors` (numpy) or `.pth` (weights_only) file."""
  if src.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(src))
  if src.endswith(('.pth', '.pt')):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('A .pth source needs torch (pip install -e '
                        "'.[parity]'); or convert model.safetensors.") from e
    sd = torch.load(src, map_location='cpu', weights_only=True)
    return {k: v.detach().float().numpy() for k, v in sd.items()}
  raise ValueError(f'{src}: expected a .safetensors (Hugging Face '
                   f'{dinov2.HF_REPO}) or a .pth (torch.hub) file.')


def _linear(sd: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, ...]:
  return (np.asarray(sd[f'{name}.weight'], np.float32).T,
          np.asarray(sd[f'{name}.bias'], np.float32))


def _hf_names(sd: Mapping[str, np.ndarray], i: int) -> dict[str, str]:
  """Our block names -> HF names (either attention naming) for block i."""
  b = f'encoder.layer.{i}'
  old = f'{b}.attention.attention.query.weight' in sd
  att = (lambda x: f'{b}.attention.attention.{x}') if old else (
      lambda x: f'{b}.attention.{x[0]}_proj')
  return {'norm1': f'{b}.norm1', 'norm2': f'{b}.norm2',
          'ls1': f'{b}.layer_scale1.lambda1',
          'ls2': f'{b}.layer_scale2.lambda1',
          'q': att('query'), 'k': att('key'), 'v': att('value'),
          'proj': (f'{b}.attention.output.dense' if old
                   else f'{b}.attention.o_proj'),
          'fc1': f'{b}.mlp.fc1', 'fc2': f'{b}.mlp.fc2'}


def convert_state_dict(state_dict: Mapping[str, Any],
                       num_heads: int | None = None
                       ) -> tuple[dict[str, np.ndarray], dinov2.Arch]:
  """An HF or torch.hub DINOv2 state dict -> (params, arch).

  Raises:
    ValueError: an unknown layout, registers / SwiGLU, or wrong shapes.
  """
  sd = {re.sub(r'^dinov2\.', '', k): np.asarray(v)
        for k, v in state_dict.items()}
  hf = 'embeddings.patch_embeddings.projection.weight' in sd
  if not hf and 'patch_embed.proj.weight' not in sd:
    raise ValueError('Not a DINOv2 state dict: neither embeddings.patch_'
                     'embeddings.projection.weight (HF) nor patch_embed.proj.'
                     f'weight (torch.hub) found; keys start {sorted(sd)[:5]}.')
  if any('register' in k for k in sd) or any(
      k.endswith(('weights_in.weight', 'w12.weight')) for k in sd):
    raise ValueError('Register tokens / SwiGLU MLPs are not supported: '
                     'convert dinov2_vitl14 (facebook/dinov2-large).')
  pre = 'embeddings.' if hf else ''
  conv = sd[f'{pre}patch_embeddings.projection.weight' if hf
            else 'patch_embed.proj.weight']
  width, _, patch, _ = conv.shape
  blocks = {int(m.group(1)) for k in sd
            if (m := re.match(r'(?:encoder\.layer|blocks)\.(\d+)\.', k))}
  depth = len(blocks)
  pos = sd['embeddings.position_embeddings' if hf else 'pos_embed']
  grid = int(round(np.sqrt(pos.shape[-2] - 1)))
  mlp_name = (_hf_names(sd, 0)['fc1'] if hf else 'blocks.0.mlp.fc1')
  arch = dinov2.Arch(width=int(width), depth=depth,
                     num_heads=int(num_heads or width // dinov2.HEAD_DIM),
                     mlp=int(sd[f'{mlp_name}.weight'].shape[0]),
                     patch=int(patch), grid=grid)
  p: dict[str, np.ndarray] = {
      'patch_embed.kernel': conv.transpose(2, 3, 1, 0).reshape(-1, width),
      'patch_embed.bias': sd[f'{pre}patch_embeddings.projection.bias' if hf
                             else 'patch_embed.proj.bias'],
      'cls_token': sd[f'{pre}cls_token' if hf else 'cls_token'].reshape(-1),
      'pos_embed': pos.reshape(-1, width),
      'norm.scale': sd['layernorm.weight' if hf else 'norm.weight'],
      'norm.bias': sd['layernorm.bias' if hf else 'norm.bias']}
  for i in range(depth):
    b = f'blocks.{i}'
    if hf:
      n = _hf_names(sd, i)
      qkv = [_linear(sd, n[x]) for x in 'qkv']
      p[f'{b}.attn.qkv.kernel'] = np.concatenate([w for w, _ in qkv], 1)
      p[f'{b}.attn.qkv.bias'] = np.concatenate([c for _, c in qkv])
    else:
      n = {'norm1': f'{b}.norm1', 'norm2': f'{b}.norm2',
           'ls1': f'{b}.ls1.gamma', 'ls2': f'{b}.ls2.gamma',
           'proj': f'{b}.attn.proj', 'fc1': f'{b}.mlp.fc1',
           'fc2': f'{b}.mlp.fc2'}
      (p[f'{b}.attn.qkv.kernel'],
       p[f'{b}.attn.qkv.bias']) = _linear(sd, f'{b}.attn.qkv')
    for ours, theirs in (('norm1', 'norm1'), ('norm2', 'norm2')):
      p[f'{b}.{ours}.scale'] = sd[f'{n[theirs]}.weight']
      p[f'{b}.{ours}.bias'] = sd[f'{n[theirs]}.bias']
    p[f'{b}.ls1'], p[f'{b}.ls2'] = sd[n['ls1']], sd[n['ls2']]
    p[f'{b}.attn.proj.kernel'], p[f'{b}.attn.proj.bias'] = _linear(
        sd, n['proj'])
    for fc in ('fc1', 'fc2'):
      p[f'{b}.mlp.{fc}.kernel'], p[f'{b}.mlp.{fc}.bias'] = _linear(sd, n[fc])
  p = {k: np.ascontiguousarray(v, np.float32) for k, v in p.items()}
  dinov2.check_params(p, arch)
  return p, arch


def _heads_from_config(src: str) -> int | None:
  """num_attention_heads of the config.json beside `src`, if any."""
  path = os.path.join(os.path.dirname(os.path.abspath(src)), 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f).get('num_attention_heads')


def convert(src: str, dst: str, num_heads: int | None = None) -> str:
  """Converts `src` to `dst`; returns dst's sha256."""
  params, arch = convert_state_dict(
      read_state_dict(src), num_heads or _heads_from_config(src))
  dinov2.save_params(params, dst, arch, {
      'source': os.path.basename(src),
      'source_sha256': weights_io.file_sha256(src)})
  return weights_io.file_sha256(dst)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(
      prog='python -m onestep_bench.evaluators.convert_dinov2',
      description=__doc__.split('\n', 1)[0])
  parser.add_argument('--src', required=True,
                      help='model.safetensors (HF) or a torch.hub .pth')
  parser.add_argument('--dst', default=dinov2.DEFAULT_WEIGHTS_PATH,
                      help='output .npz (default: %(default)s)')
  parser.add_argument('--num_heads', type=int, default=None,
                      help='attention heads (default: config.json beside '
                           '--src, else width / 64)')
  args = parser.parse_args(argv)
  dst = os.path.abspath(os.path.expanduser(args.dst))
  sha = convert(os.path.expanduser(args.src), dst, args.num_heads)
  print(f'wrote {dst} (sha256 {sha}). Use it via the default path, '
        f'DinoV2Extractor(weights_path=...) or {dinov2.WEIGHTS_ENV}. If the '
        'source is the official checkpoint, record this sha256 as '
        'dinov2.OFFICIAL_NPZ_SHA256.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
