"""Stand-in for ``modules/postprocessing.py``: the Extras tab — the image goes through the
postprocessing scripts, becomes the preview, and is saved (unless the API asked not to)."""

from modules import images, scripts, scripts_postprocessing, shared
from modules.shared import opts


def run_postprocessing(extras_mode, image, image_folder, input_dir, output_dir, show_extras_results, *args,
                       save_output: bool = True):
    shared.state.begin(job="extras")
    outpath = output_dir or opts.outdir_samples
    existing_pnginfo = dict(image.info or {})
    pp = scripts_postprocessing.PostprocessedImage(image if image.mode in ("RGBA", "RGB") else image.convert("RGB"))
    scripts.scripts_postproc.run(pp, args)
    infotext = ", ".join([k if k == v else f'{k}: {v}' for k, v in pp.info.items() if v is not None])
    pp.image.info = existing_pnginfo
    pp.image.info["postprocessing"] = infotext
    shared.state.assign_current_image(pp.image)
    if save_output:
        images.save_image(pp.image, path=outpath, basename='', extension=opts.samples_format, info=infotext,
                          short_filename=True, no_prompt=True, grid=False, pnginfo_section_name="extras",
                          existing_info=existing_pnginfo)
    shared.state.end()
    return [pp.image], infotext, ''
