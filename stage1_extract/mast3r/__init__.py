"""MASt3R teacher: a checkpoint-compatible network, its loader, and the reciprocal-NN matcher.

Modules (import the one you need; nothing heavy is imported here):
- `config`: `Mast3rConfig` (full size and `tiny()`), translation of the official constructor arguments.
- `network`: `Mast3rNet` and `Mast3rOutput` (points, confidences, descriptors, cross-attention cost volume);
  built from `layers` (RoPE, attention, blocks), `dpt` and `heads`.
- `checkpoint`: `load_mast3r` from a .safetensors/.pth file, a directory or a hub id, strict key matching;
  `save_mast3r`, `convert_checkpoint`.
- `matching`: `MatchConfig`, `reciprocal_matches` (exact, batched, device-agnostic).
- `precision`: scoped TF32 switch used by the heads, the cost volume and the matcher.
- `preprocess`: image resizing and normalisation for the network.
- `teacher`: `Mast3rTeacher`, the `geod.stage1_extract.teacher.Teacher` adapter.
- `official_keys.json`: the official checkpoint's state-dict keys and shapes (checked by the tests).
"""
