"""Stage 2: distil cached 3D-teacher targets into a vision encoder (LoRA, adapters, heads) and evaluate it.

Modules: config (dataclasses), students (registry of encoders) with student_families, vlm_towers,
tiny_students and timm_student, adapters (LoRA, bottlenecks, heads), model (features and loss
composition), losses, data (streaming batches), train (`run_distill`), checkpoint (resume, outputs,
`load_distilled`), evaluate (`evaluate`), export_vlm (`geod export`).
"""
