"""Tiny randomly initialised pipelines of every supported family, built from configs (no downloads),
with the world's tokenizer: what tests use to check the model families end to end."""
from __future__ import annotations

import tempfile

import torch


def _tokenizer():
    from transformers import CLIPTokenizer

    from trust_fast.world.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d)


def _text_config(tok, hidden: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                          **kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd_pipeline(prediction_type: str = "epsilon", scheduler=None):
    """A randomly initialised StableDiffusionPipeline (UNet with cross-attention, AutoencoderKL,
    CLIP text encoder, the world's tokenizer). `prediction_type` "v_prediction" with an Euler
    scheduler is the SD 2.x setup."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = _vae()  # (built in this order since the first version: the tests' seeds depend on it)
    te = CLIPTextModel(_text_config(tok, 32))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=scheduler or _ddim(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline():
    """A randomly initialised StableDiffusionXLPipeline: two CLIP text encoders (the second with a
    projection: the pooled embedding), a UNet with SDXL's added conditions ("text_time")."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModel(_text_config(tok, 16))
    te2 = CLIPTextModelWithProjection(_text_config(tok, 32, projection_dim=24))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32, attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 24,
        use_linear_projection=True)
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unsupported_pipeline():
    """An unconditional DDPMPipeline: no text encoder, nothing trust_fast can unlearn from."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def tiny_t5():
    """A T5 encoder (width 32) and a T5-like tokenizer built in code: word-level, no start token,
    an end token after the words, as T5's sentencepiece tokenizer writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "circle", "square", "car", "striped", "large"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=512)
    torch.manual_seed(1)
    te = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 dropout_rate=0.0))
    return tok, te


def tiny_sd3_pipeline(t5: bool = False):
    """A randomly initialised StableDiffusion3Pipeline: an SD3Transformer2DModel (MMDiT) with two
    CLIP encoders with projections and, unless `t5`, no T5 (diffusers then feeds zeros in its
    place), flow matching (FlowMatchEulerDiscreteScheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok = _tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(_text_config(tok, 16, projection_dim=8))
    te2 = CLIPTextModelWithProjection(_text_config(tok, 16, projection_dim=8))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    **dict(zip(("tokenizer_3", "text_encoder_3"), tiny_t5() if t5 else (None, None))))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(guidance_embeds: bool = True):
    """A randomly initialised FluxPipeline: a FluxTransformer2DModel (one dual-stream and one
    single-stream block) on 2x2-packed latents of a 4-channel VAE, a CLIP text encoder (its pooled
    output) and the tiny T5 (its states), flow matching with the resolution shift
    (FlowMatchEulerDiscreteScheduler with dynamic shifting, as FLUX.1's). `guidance_embeds`: the
    guidance-distilled transformer (FLUX.1 dev); False is schnell's kind. It samples the
    pipeline's default 128 x 128 latents (4096 image tokens): FluxPipeline fixes that size."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok = _tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModel(_text_config(tok, 16))
    tok2, te2 = tiny_t5()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
