"""Stand-in for ``modules/postprocessing.py``: the Extras tab — every image goes through the
postprocessing scripts, becomes the preview, and is saved (unless the API asked not to)."""



from modules import images, scripts, scripts_postprocessing, shared
from modules.shared import opts


def run_postprocessing(extras_mode, image, image_folder, input_dir, output_dir, show_extras_results, *args,
                       save_output: bool = True):
    shared.state.begin(job="extras")
    outputs = []
    data = [(img, None) for img in image_folder] if extras_mode == 1 else [(image, None)]
    outpath = output_dir or opts.outdir_samples or opts.outdir_extras_samples
    infotext = ''
    for image_data, name in data:
        shared.state.nextjob()
        image_data = image_data if image_data.mode in ("RGBA", "RGB") else image_data.convert("RGB")
        parameters, existing_pnginfo = images.read_info_from_image(image_data)
        if parameters:
            existing_pnginfo["parameters"] = parameters
        initial_pp = scripts_postprocessing.PostprocessedImage(image_data)
        scripts.scripts_postproc.run(initial_pp, args)
        for pp in [initial_pp, *initial_pp.extra_images]:
            suffix = pp.get_suffix({})
            infotext = ", ".join([k if k == v else f'{k}: {v}' for k, v in pp.info.items() if v is not None])
            if opts.enable_pnginfo:
                pp.image.info = existing_pnginfo
                pp.image.info["postprocessing"] = infotext
            shared.state.assign_current_image(pp.image)
            if save_output:
                images.save_image(pp.image, path=outpath, basename='', extension=opts.samples_format, info=infotext,
                                  short_filename=True, no_prompt=True, grid=False, pnginfo_section_name="extras",
                                  existing_info=existing_pnginfo, suffix=suffix)
            if extras_mode != 2 or show_extras_results:
                outputs.append(pp.image)
    shared.state.end()
    return outputs, infotext, ''

