"""Stand-in for ``modules/shared_state.py``: job progress (the sampler's step) and the live
preview (``assign_current_image``, read back by the progress API as ``current_image``)."""


class State:
    sampling_step = 0
    sampling_steps = 0
    current_image = None

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.current_image = None

    def end(self):
        pass

    def assign_current_image(self, image):
        self.current_image = image
