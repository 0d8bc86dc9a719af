"""Stand-in for Forge's ``modules/sysinfo.py`` ``set_config`` (what its ``POST /sdapi/v1/options``
and ``override_settings`` call): each option through ``opts.set(key, value, is_api=...)``,
then the options saved. A1111 has no such function (its API route sets options itself)."""

from modules import _variant

if _variant.forge_like():
    def set_config(req, is_api=False, run_callbacks=True):
        from modules import shared
        for k, v in req.items():
            shared.opts.set(k, v, is_api=is_api, run_callbacks=run_callbacks)
        shared.opts.saved = dict(shared.opts.data)
