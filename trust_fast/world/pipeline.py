"""ShapesPipeline: a pixel-space text-to-image diffusers pipeline (UNet2DConditionModel + CLIP text encoder).

Same components and call convention as StableDiffusionPipeline minus the VAE: at 16x16 a
latent space would save nothing and would cost a second model to train and ship, so the
UNet denoises RGB pixels directly. `import trust_fast` registers the class with diffusers,
so `diffusers.DiffusionPipeline.from_pretrained(path)` loads a saved ShapesPipeline.
"""
from __future__ import annotations

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class ShapesPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def parse_concept(self, text: str):
        """A concept spec checked against the world's words (how TrustUnlearner reads a string concept)."""
        from ..concepts import parse_concept

        return parse_concept(text, world=True)

    def concept_prompts(self, spec, partial: bool = False):
        """The world's training prompt sets for a concept (TrustUnlearner's default prompts): every
        description under each unlearning template; with `partial`, the prompts that name only part
        of the concept too (trust_fast.world.concepts.partial_prompts)."""
        from .concepts import world_prompts

        return world_prompts(spec, every_template=True, partial=partial)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) for a list of prompts, on the UNet's device and dtype."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        emb = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return emb.to(self.unet.device, self.unet.dtype)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 25,
                 guidance_scale: float = 1.5, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, prompt_embeds: torch.Tensor | None = None):
        """Sample images. output_type: "pil", "np" or "pt" (in [0, 1]) or "latent" (raw pixels in [-1, 1]).
        `prompt_embeds` (N, L, D) replaces `prompt` (as in StableDiffusionPipeline)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if prompt_embeds is not None:
            cond = prompt_embeds.to(self.unet.device, self.unet.dtype).repeat_interleave(num_images_per_prompt, 0)
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self.encode_prompt([p for p in prompts for _ in range(num_images_per_prompt)])
        n = cond.shape[0]
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            uncond = self.encode_prompt([""] * n)
        size = self.unet.config.sample_size
        if latents is None:
            latents = torch.randn(n, self.unet.config.in_channels, size, size, generator=generator,
                                  dtype=torch.float32, device="cpu" if generator is None else generator.device)
        x = latents.to(self.unet.device, self.unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            if use_cfg:
                eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = self.unet(x, t, encoder_hidden_states=cond).sample
            x = self.scheduler.step(eps, t, x).prev_sample
        x = x.clamp(-1, 1).float()
        if output_type == "latent":
            images = x
        else:
            images = (x + 1) / 2
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type must be pil, np, pt or latent, not {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# diffusers resolves a model_index.json "_class_name" by attribute lookup on the diffusers module.
setattr(diffusers, "ShapesPipeline", ShapesPipeline)
