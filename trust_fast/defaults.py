"""Defaults shared by the CLI and the evaluation, in a module that imports nothing heavy (the
CLI's --help must not wait for torch)."""

DEFAULT_STEPS = 25      # sampling steps of evaluation images (the model's own scheduler)
DEFAULT_GUIDANCE = 1.5  # classifier-free guidance of evaluation images (the shapes world wants low guidance)
EMBEDDING_STEPS = 100   # Adam steps of the embedding attack (per prompt)
AMP_MODES = ("auto", "bf16", "fp16", "off")  # TrustConfig.amp
ADV_MODES = ("prefix", "tokens")            # TrustConfig.adv_mode
INVERSION_STEPS = 200   # Adam steps of the inversion attack (one learned word for all prompts)
