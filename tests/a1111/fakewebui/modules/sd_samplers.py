"""Stand-in for ``modules/sd_samplers.py``: "Euler" (k-diffusion, x0 predictions) and "DDIM"
(timesteps, ε predictions)."""

from modules.sd_samplers_common import sample_to_image  # noqa: F401


def create_sampler(name, model):
    from modules import sd_samplers_kdiffusion, sd_samplers_timesteps
    if name in (None, "Euler"):
        return sd_samplers_kdiffusion.KDiffusionSampler("sample_euler", model)
    if name == "Heun":        # second order: two model calls per step but the last
        return sd_samplers_kdiffusion.KDiffusionSampler("sample_heun", model)
    return sd_samplers_timesteps.CompVisSampler("ddim", model)   # "DDIM"

