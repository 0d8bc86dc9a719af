"""Stand-in for ``modules/sd_unet.py``: the alternative UNet the webui routes the model's
forward to (``current_unet``; None: the model's own UNet)."""

current_unet_option = None
current_unet = None
