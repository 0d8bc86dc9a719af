"""A1111 / Forge: command-line flags, read before the webui parses its arguments.

``--safet2i-enforce`` turns the output filter into an operator setting: every generated,
intermediate, grid and Extras image is checked with at least the given policy and a censoring
action, whatever the UI, API requests or ``override_settings`` say. ComfyUI ignores this file.
"""


def preload(parser):
    parser.add_argument("--safet2i-enforce", action="store_true",
                        help="SafeT2I: always run the output filter; UI and API cannot switch it off")
    parser.add_argument("--safet2i-enforce-policy", default="strict-5", choices=["strict-5", "broad-9"],
                        help="SafeT2I: minimum policy when enforced (default strict-5)")
    parser.add_argument("--safet2i-enforce-action", default="blur",
                        choices=["blur", "pixelate", "fill", "black", "placeholder", "block"],
                        help="SafeT2I: action for unsafe images when enforced (default blur)")
