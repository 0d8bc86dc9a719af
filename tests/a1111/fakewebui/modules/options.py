"""Stand-in for ``modules/options.py``: settings with ``restrict_api`` (refused through the API
and ``override_settings``)."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, *, section=None,
                 refresh=None, restrict_api=False):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args      # a dict, or a function returning one (the Settings tab)
        self.section = section
        self.refresh = refresh
        self.restrict_api = restrict_api


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        v.section = section_identifier
    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts"}


class Options:
    def __init__(self, data_labels: dict, restricted_opts):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items()}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key, value):
        if key not in options_builtin_fields and (key in self.data or key in self.data_labels):
            self.data[key] = value
            return None
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item not in options_builtin_fields and item in self.data:
            return self.data[item]
        return super().__getattribute__(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        if is_api and self.data_labels[key].restrict_api:
            return False
        setattr(self, key, value)
        return True

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default
