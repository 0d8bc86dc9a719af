"""Stand-in for ``modules/shared_options.py``: the built-in settings the stand-in reads."""

from modules import _variant
from modules.options import OptionInfo, options_section

options_templates = {}

options_templates.update(options_section(('saving-images', "Saving images/grids"), {
    "samples_format": OptionInfo('png', 'File format for images'),
    "grid_format": OptionInfo('png', 'File format for grids'),
    "save_images_before_face_restoration": OptionInfo(False, "Save a copy of image before doing face restoration."),
    "save_images_before_highres_fix": OptionInfo(False, "Save a copy of image before applying highres fix."),
    "save_images_before_color_correction": OptionInfo(False, "Save a copy of image before applying color correction"),
}))

options_templates.update(options_section(('saving-paths', "Paths for saving"), {
    "outdir_samples": OptionInfo("", "Output directory for images"),
}))

options_templates.update(options_section(('face-restoration', "Face restoration"), {
    "face_restoration": OptionInfo(False, "Restore faces"),
}))

if not _variant.is_17():
    options_templates["skip_early_cond"] = OptionInfo(0.0, "Ignore negative prompt during early sampling",
                                                      section=("sampler-params", "Sampler parameters"))

options_templates.update(options_section(('img2img', "img2img"), {
    "img2img_color_correction": OptionInfo(False, "Apply color correction to img2img results to match original colors."),
}))

if not _variant.is_17():
    options_templates['postprocessing_disable_in_extras'] = OptionInfo(
        [], "Disable postprocessing operations in extras tab", section=('postprocessing', "Postprocessing"))

if _variant.VARIANT == "forge":
    # Forge's T5 engine reads it (backend/text_processing/t5_engine.py)
    options_templates["emphasis"] = OptionInfo("Original", "Emphasis mode", section=('sd', "Stable Diffusion"))
    # Forge's SD3.5 reads it (backend/diffusion_engine/sd35.py): T5 rows or zero rows
    options_templates["sd3_enable_t5"] = OptionInfo(False, "Enable T5", section=("sd3", "Stable Diffusion 3"))
