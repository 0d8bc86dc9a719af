"""Stand-in for ``modules/processing.py``: the job object ``p`` and ``process_images``, which
calls the script hooks in the upstream order:

``setup`` (when ``p.scripts``/``p.script_args`` are set) → ``before_process`` →
(``override_settings`` applied with ``is_api=True``) → ``process`` → per batch:
``before_process_batch`` → extra networks (``after_extra_networks_activate``) →
``process_batch`` → conds → [Forge/reForge: fresh ``forge_objects``] →
``process_before_every_sampling`` (A1111 ≥ 1.10, Forge, reForge; again before the hires
pass, after ``before_hr``) → sampling (CFG callbacks; live previews) → [hires fix:
"-before-highres-fix" saves] → ``postprocess_batch`` →
``postprocess_batch_list`` → per image: ["-before-face-restoration" save] →
``postprocess_image`` (crop of "inpaint only masked") → ``postprocess_maskoverlay`` →
["-before-color-correction" save] → overlay composite → ``postprocess_image_after_composite``
(absent in 1.7) → sample save → grid (+ grid save) → ``postprocess``.

img2img: one init image; a mask is inpainted "only masked" (cropped to the mask's box, pasted
back over the original).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

import modules.face_restoration
import modules.images as images
import modules.shared as shared
from modules import _variant, extra_networks, prompt_parser, rng, sd_samplers, scripts
from modules.sd_samplers_common import decode_first_stage, images_tensor_to_samples
from modules.shared import opts

opt_C = 4
opt_f = 8
_V17 = _variant.is_17()
_FORGE_LIKE = _variant.forge_like()


def _uncrop(image, dest_size, paste_loc):
    x, y, w, h = paste_loc
    base_image = Image.new('RGBA', dest_size)
    image = images.resize_image(1, image, w, h)
    base_image.paste(image, (x, y))
    return base_image


def _apply_overlay(image, paste_loc, overlay):
    """Upstream ``apply_overlay``: the sample pasted back at its place and the original
    (outside the mask) composited over it."""
    if overlay is None:
        return image
    image = _uncrop(image, (overlay.width, overlay.height), paste_loc)
    image = image.convert('RGBA')
    image.alpha_composite(overlay)
    return image.convert('RGB')


def create_binary_mask(image):
    return image.convert('L').point(lambda x: 255 if x > 128 else 0)


class DecodedSamples(list):
    already_decoded = True


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    samples = DecodedSamples()
    for i in range(batch.shape[0]):
        samples.append(decode_first_stage(model, batch[i:i + 1])[0])
    return samples


def get_fixed_seed(seed):
    return 1234 if seed is None or seed == -1 else int(seed)


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    extra_generation_params: dict = None
    overlay_images: list = None
    denoising_strength: float = None
    override_settings: dict = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None

    scripts: Any = field(default=None, init=False)
    script_args_value: list = field(default=None, init=False)

    cached_uc = [None, None]
    cached_c = [None, None]

    sampler: Any = field(default=None, init=False)
    paste_to: tuple = field(default=None, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    c: tuple = field(default=None, init=False)
    uc: tuple = field(default=None, init=False)
    rng: Any = field(default=None, init=False)
    color_corrections: list = field(default=None, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    main_negative_prompt: str = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    @property
    def sd_model(self):  # noqa: F811 - a dataclass field turned property, as upstream
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    @property
    def script_args(self):
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        """Upstream: setting the arguments of a ``p`` that has its scripts runs their ``setup``."""
        self.script_args_value = value
        self.scripts.setup_scrips(self)

    def txt2img_image_conditioning(self, x, width=None, height=None):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None

    def setup_prompts(self):
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """Upstream: what invalidates the cond cache when it changes (the prompts, steps, the
        checkpoint, the extra networks, the size; not the model's weights)."""
        return (required_prompts, steps, hires_steps, use_old_scheduling, shared.sd_model.sd_checkpoint_info,
                extra_network_data, self.width, self.height)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        """Upstream: ``function(shared.sd_model, required_prompts, steps, hires_steps, ...)`` unless
        one of ``caches`` (``[params, result]`` lists) holds the result for the same params."""
        cached_params = self.cached_params(required_prompts, steps, extra_network_data, hires_steps)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps)
        cache[0] = cached_params
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                        is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative_prompts, self.steps,
                                              [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, self.steps,
                                             [self.cached_c], self.extra_network_data)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list, *, info="", index_of_first_image=0,
                 infotexts=None):
        self.images = images_list
        self.info = info
        self.index_of_first_image = index_of_first_image
        self.infotexts = infotexts


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """``Key: value`` pairs of the job and ``p.extra_generation_params`` (``None`` values left out)."""
    from modules._infotext_impl import quote  # noqa: PLC0415
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    text = ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{text}".strip()


def process_images(p: StableDiffusionProcessing) -> Processed:
    p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] for k in p.override_settings.keys() if k in opts.data}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        res = process_images_inner(p)
    finally:
        for k, v in stored_opts.items():
            setattr(opts, k, v)
    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)
    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    p.setup_prompts()
    p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.no_grad():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        for n in range(p.n_iter):
            p.iteration = n
            if _FORGE_LIKE:
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.rng = rng.ImageRNG((opt_C, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds)

            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                           subseeds=p.subseeds)
            p.parse_extra_network_prompts()
            extra_networks.activate(p, p.extra_network_data)
            if _FORGE_LIKE:
                p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()

            samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                                    subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)
            if getattr(samples_ddim, 'already_decoded', False):
                x_samples_ddim = samples_ddim
            else:
                x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim)
            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)

            p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            batch_params = scripts.PostprocessBatchListArgs(list(x_samples_ddim))
            p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
            x_samples_ddim = batch_params.images

            def infotext(index=0, use_main_prompt=False):
                return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt,
                                       index=index, all_negative_prompts=p.negative_prompts)

            for i, x_sample in enumerate(x_samples_ddim):
                x_sample = (255. * np.moveaxis(x_sample.cpu().numpy(), 0, 2)).astype(np.uint8)
                if p.restore_faces:
                    if opts.save_images_before_face_restoration:
                        images.save_image(Image.fromarray(x_sample), p.outpath_samples, "", p.seeds[i], p.prompts[i],
                                          opts.samples_format, info=infotext(i), p=p,
                                          suffix="-before-face-restoration")
                    x_sample = modules.face_restoration.restore_faces(x_sample)
                image = Image.fromarray(x_sample)
                pp = _postprocess_image_args(p, image, i)
                p.scripts.postprocess_image(p, pp)
                image = pp.image
                overlay_image = p.overlay_images[i] if p.overlay_images is not None else None
                if not _V17:
                    ppmo = scripts.PostProcessMaskOverlayArgs(i, getattr(p, "mask_for_overlay", None), overlay_image)
                    p.scripts.postprocess_maskoverlay(p, ppmo)
                    overlay_image = ppmo.overlay_image
                if p.color_corrections is not None:
                    if opts.save_images_before_color_correction:
                        images.save_image(_apply_overlay(image, p.paste_to, overlay_image), p.outpath_samples, "",
                                          p.seeds[i], p.prompts[i], opts.samples_format, info=infotext(i), p=p,
                                          suffix="-before-color-correction")
                    image = _apply_color_correction(p.color_corrections[i], image)
                image = _apply_overlay(image, p.paste_to, overlay_image)
                if not _V17:
                    pp = _postprocess_image_args(p, image, i)
                    p.scripts.postprocess_image_after_composite(p, pp)
                    image = pp.image

                images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], opts.samples_format,
                                  info=infotext(i), p=p)
                text = infotext(i)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)
            del x_samples_ddim

        p.color_corrections = None
        index_of_first_image = 0
        if len(output_images) > 1:       # the grid: shown first and saved (not for a single picture)
            grid = images.image_grid(output_images, p.batch_size)
            text = infotext(use_main_prompt=True)
            infotexts.insert(0, text)
            grid.info["parameters"] = text
            output_images.insert(0, grid)
            index_of_first_image = 1
            images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                              info=infotext(use_main_prompt=True), short_filename=True, p=p, grid=True)

    if p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    res = Processed(p, output_images, info=infotexts[0], index_of_first_image=index_of_first_image,
                    infotexts=infotexts)
    p.scripts.postprocess(p, res)
    return res


def _postprocess_image_args(p, image, i):
    if _variant.VARIANT == "forge":
        return scripts.PostprocessImageArgs(image, i + p.iteration * p.batch_size)
    return scripts.PostprocessImageArgs(image)


def _apply_color_correction(correction, original_image):
    """Stand-in colour correction: a new image object (upstream matches histograms)."""
    return Image.fromarray(np.asarray(original_image.convert("RGB")))


def _forge_fresh_unet(p):
    if _FORGE_LIKE:
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_checkpoint_name: str = None
    if _variant.VARIANT == "forge":
        hr_additional_modules: list = field(default=None)
    if _FORGE_LIKE:
        hr_cfg: float = 1.0

    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)
    hr_c: tuple = field(default=None, init=False)
    hr_uc: tuple = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)
    all_hr_negative_prompts: list = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: list = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def init(self, all_prompts, all_seeds, all_subseeds):
        if self.enable_hr:
            self.extra_generation_params["Denoising strength"] = self.denoising_strength
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)
            self.extra_generation_params["Hires upscale"] = self.hr_scale

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        _forge_fresh_unet(self)
        if not _V17:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        self.is_hr_pass = True
        if opts.save_images_before_highres_fix:
            for index in range(samples.shape[0]):
                info = create_infotext(self, self.all_prompts, self.all_seeds, self.all_subseeds, [],
                                       iteration=self.iteration, position_in_batch=index)
                images.save_image(sd_samplers.sample_to_image(samples, index), self.outpath_samples, "",
                                  seeds[index], prompts[index], opts.samples_format, info=info, p=self,
                                  suffix="-before-highres-fix")
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        samples = torch.nn.functional.interpolate(samples, size=(self.hr_upscale_to_y // opt_f,
                                                                 self.hr_upscale_to_x // opt_f), mode="nearest")
        image_conditioning = self.txt2img_image_conditioning(samples)
        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds)
        noise = self.rng.next()
        extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        if _variant.VARIANT == "reforge":
            _forge_fresh_unet(self)
        self.scripts.before_hr(self)
        if not _V17:
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c,
                                                       uc=self.hr_uc)
        if _variant.VARIANT == "forge":    # Forge resets the UNet and asks again
            _forge_fresh_unet(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c,
                                                       uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        decoded_samples = decode_latent_batch(self.sd_model, samples)
        self.is_hr_pass = False
        return decoded_samples

    def setup_prompts(self):
        super().setup_prompts()
        if not self.enable_hr:
            return
        self.all_hr_prompts = list(self.all_prompts)            # the hires prompts are the prompts
        self.all_hr_negative_prompts = list(self.all_negative_prompts)

    def calculate_hr_conds(self):
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x,
                                                  height=self.hr_upscale_to_y)
        hr_negative_prompts = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x,
                                                           height=self.hr_upscale_to_y, is_negative_prompt=True)
        steps = self.hr_second_pass_steps or self.steps
        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, hr_negative_prompts,
                                                 steps, [self.cached_hr_uc, self.cached_uc],
                                                 self.hr_extra_network_data, steps)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, hr_prompts,
                                                steps, [self.cached_hr_c, self.cached_c], self.hr_extra_network_data,
                                                steps)

    def parse_extra_network_prompts(self):
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_negative_prompts = self.all_hr_negative_prompts[
                self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = None
    denoising_strength: float = 0.75
    mask: Any = None
    inpaint_full_res: bool = True       # the only inpainting area modelled: "Only masked"
    inpaint_full_res_padding: int = 0

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor = field(default=None, init=False)
    image_conditioning: torch.Tensor = field(default=None, init=False)
    mask_for_overlay: Image.Image = field(default=None, init=False)
    init_latent: torch.Tensor = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.image_mask = self.mask
        self.mask = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        crop_region = None
        image_mask = self.image_mask
        if image_mask is not None:
            image_mask = create_binary_mask(image_mask)
            self.mask_for_overlay = image_mask
            mask = image_mask.convert('L')
            crop_region = _crop_region(mask, self.inpaint_full_res_padding, self.width, self.height)
            x1, y1, x2, y2 = crop_region
            mask = mask.crop(crop_region)
            image_mask = images.resize_image(2, mask, self.width, self.height)
            self.paste_to = (x1, y1, x2 - x1, y2 - y1)
            self.extra_generation_params["Inpaint area"] = "Only masked"
            self.overlay_images = []

        image = self.init_images[0].convert("RGB")
        if crop_region is None:
            image = images.resize_image(0, image, self.width, self.height)
        else:
            image_masked = Image.new('RGBa', (image.width, image.height))
            image_masked.paste(image.convert("RGBA").convert("RGBa"),
                               mask=ImageOps.invert(self.mask_for_overlay.convert('L')))
            self.overlay_images = [image_masked.convert('RGBA')] * self.batch_size
            image = images.resize_image(2, image.crop(crop_region), self.width, self.height)
        if opts.img2img_color_correction and self.color_corrections is None:
            self.color_corrections = [np.asarray(image)] * self.batch_size
        image = np.moveaxis(np.array(image).astype(np.float64) / 255.0, 2, 0)
        batch_images = np.expand_dims(image, axis=0).repeat(self.batch_size, axis=0)
        self.init_latent = images_tensor_to_samples(torch.from_numpy(batch_images), None, self.sd_model)
        if image_mask is not None:
            latmask = image_mask.convert('RGB').resize((self.init_latent.shape[3], self.init_latent.shape[2]))
            latmask = np.around(np.moveaxis(np.array(latmask, dtype=np.float64), 2, 0)[0] / 255)
            latmask = np.tile(latmask[None], (self.init_latent.shape[1], 1, 1))
            self.mask = torch.asarray(1.0 - latmask)
            self.nmask = torch.asarray(latmask)
        self.image_conditioning = self.init_latent.new_zeros(self.init_latent.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng.next()
        _forge_fresh_unet(self)
        if not _V17:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


def _crop_region(mask, pad, width, height):
    """Bounding box of the mask plus padding, grown to the processing aspect ratio."""
    box = mask.getbbox() or (0, 0, mask.width, mask.height)
    x1, y1, x2, y2 = box
    x1, y1, x2, y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)
    ratio = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < ratio:
        nw = min(mask.width, math.ceil(h * ratio))
        x1 = max(0, min(x1 - (nw - w) // 2, mask.width - nw))
        x2 = x1 + nw
    else:
        nh = min(mask.height, math.ceil(w / ratio))
        y1 = max(0, min(y1 - (nh - h) // 2, mask.height - nh))
        y2 = y1 + nh
    return x1, y1, x2, y2
