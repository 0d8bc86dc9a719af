"""Stand-in for ``modules/shared_options.py``: the built-in settings the stand-in reads."""

import os

from modules import _variant
from modules.options import OptionInfo, options_section
from modules.paths import data_path

options_templates = {}

options_templates.update(options_section(('saving-images', "Saving images/grids"), {
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "samples_format": OptionInfo('png', 'File format for images'),
    "samples_filename_pattern": OptionInfo("", "Images filename pattern"),
    "save_images_add_number": OptionInfo(True, "Add number to filename when saving"),
    "grid_save": OptionInfo(True, "Always save all generated image grids"),
    "grid_format": OptionInfo('png', 'File format for grids'),
    "grid_only_if_multiple": OptionInfo(True, "Do not save grids consisting of one picture"),
    "n_rows": OptionInfo(-1, "Grid row count"),
    "grid_background_color": OptionInfo("#ffffff", "Grid background color"),
    "enable_pnginfo": OptionInfo(True, "Save text information about generation parameters as chunks to png files"),
    "save_images_before_face_restoration": OptionInfo(False, "Save a copy of image before doing face restoration."),
    "save_images_before_highres_fix": OptionInfo(False, "Save a copy of image before applying highres fix."),
    "save_images_before_color_correction": OptionInfo(False, "Save a copy of image before applying color correction"),
    "save_mask": OptionInfo(False, "For inpainting, save a copy of the greyscale mask"),
    "save_mask_composite": OptionInfo(False, "For inpainting, save a masked composite"),
    "use_original_name_batch": OptionInfo(True, "Use original name for output filename during batch process"),
}))

options_templates.update(options_section(('saving-paths', "Paths for saving"), {
    "outdir_samples": OptionInfo("", "Output directory for images"),
    "outdir_txt2img_samples": OptionInfo(os.path.join(data_path, "outputs", "txt2img-images"), "txt2img"),
    "outdir_img2img_samples": OptionInfo(os.path.join(data_path, "outputs", "img2img-images"), "img2img"),
    "outdir_extras_samples": OptionInfo(os.path.join(data_path, "outputs", "extras-images"), "extras"),
    "outdir_txt2img_grids": OptionInfo(os.path.join(data_path, "outputs", "txt2img-grids"), "txt2img grids"),
    "outdir_img2img_grids": OptionInfo(os.path.join(data_path, "outputs", "img2img-grids"), "img2img grids"),
}))

options_templates.update(options_section(('saving-to-dirs', "Saving to a directory"), {
    "save_to_dirs": OptionInfo(True, "Save images to a subdirectory"),
    "grid_save_to_dirs": OptionInfo(True, "Save grids to a subdirectory"),
}))

options_templates.update(options_section(('face-restoration', "Face restoration"), {
    "face_restoration": OptionInfo(False, "Restore faces"),
}))

options_templates.update(options_section(('optimizations', "Optimizations"), {
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
}))
if not _variant.is_17():
    options_templates["pad_cond_uncond_v0"] = OptionInfo(False, "Pad prompt/negative prompt (v0)", section=("optimizations", "Optimizations"))

options_templates.update(options_section(('sampler-params', "Sampler parameters"), {
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma"),
}))
if not _variant.is_17():
    options_templates["s_min_uncond_all"] = OptionInfo(False, "NGMS: Skip every step", section=("sampler-params", "Sampler parameters"))
    options_templates["skip_early_cond"] = OptionInfo(0.0, "Ignore negative prompt during early sampling",
                                                      section=("sampler-params", "Sampler parameters"))

options_templates.update(options_section(('ui', "Live previews"), {
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "live_previews_image_format": OptionInfo("png", "Live preview file format"),
    "show_progress_grid": OptionInfo(True, "Show previews of all images generated in a batch as a grid"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
    "live_preview_content": OptionInfo("Prompt", "Live preview subject"),
}))

options_templates.update(options_section(('infotext', "Infotext"), {
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
}))

options_templates.update(options_section(('img2img', "img2img"), {
    "img2img_color_correction": OptionInfo(False, "Apply color correction to img2img results to match original colors."),
    "return_mask": OptionInfo(False, "For inpainting, include the greyscale mask in results for web"),
    "return_mask_composite": OptionInfo(False, "For inpainting, include masked composite in results for web"),
    "return_grid": OptionInfo(True, "Show grid in gallery"),
}))
if not _variant.is_17():
    options_templates["overlay_inpaint"] = OptionInfo(True, "Overlay original for inpaint", section=("img2img", "img2img"))

options_templates.update(options_section(('postprocessing', "Postprocessing"), {
    'postprocessing_enable_in_main_ui': OptionInfo([], "Enable postprocessing operations in txt2img and img2img tabs"),
    'postprocessing_operation_order': OptionInfo([], "Postprocessing operation order"),
}))
if not _variant.is_17():
    options_templates['postprocessing_disable_in_extras'] = OptionInfo(
        [], "Disable postprocessing operations in extras tab", section=('postprocessing', "Postprocessing"))
