"""A stand-in for the original's remote code `processing_prismatic.py`, which cannot be fetched here:
our own classes under the original's names, taking the config keys the original reads
(`preprocessor_config.json`) and applying them as it does, with PIL and NumPy in place of
torchvision's functional ops on PIL images (a resize, a center crop, /255, per-tower normalisation,
towers stacked on channels). The export test copies it into a source HF directory as
`processing_prismatic.py`; transformers then imports it through "auto_map"."""

from typing import ClassVar, TypedDict

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BatchFeature, ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin


class _CallKwargs(TypedDict):
    """None: the config keys go to the constructor, not to calls."""


class PrismaticImageProcessor(ImageProcessingMixin):
    model_input_names: ClassVar[list] = ["pixel_values"]
    # transformers 5 reads this from every image processor class (the original, written for the
    # transformers 4.40 it pins, has none).
    valid_kwargs = _CallKwargs

    def __init__(
        self,
        use_fused_vision_backbone=False,
        image_resize_strategy="letterbox",
        input_sizes=None,
        interpolations=None,
        means=None,
        stds=None,
        **kwargs,
    ):
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.image_resize_strategy = image_resize_strategy
        self.input_sizes, self.interpolations, self.means, self.stds = input_sizes, interpolations, means, stds
        super().__init__(**kwargs)  # the tvf_* keys: set as attributes, as written

    def _one_tower(self, image: Image.Image, idx: int) -> np.ndarray:
        resize = self.tvf_resize_params[idx]
        size = resize["size"]
        if isinstance(size, int):  # shorter side to `size`, aspect ratio kept
            w, h = image.size
            size = [size, round(size * w / h)] if h <= w else [round(size * h / w), size]
        image = image.resize((size[1], size[0]), resample=Image.Resampling(resize["interpolation"]))
        ch, cw = self.tvf_crop_params[idx]["output_size"]
        top, left = (image.size[1] - ch) // 2, (image.size[0] - cw) // 2
        image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image, np.float32).transpose(2, 0, 1) / np.float32(255)
        norm = self.tvf_normalize_params[idx]
        mean, std = (np.asarray(norm[k], np.float32)[:, None, None] for k in ("mean", "std"))
        return (x - mean) / std

    def preprocess(self, images, return_tensors=None, **_):
        if self.tvf_do_letterbox:
            raise NotImplementedError("letterbox is not part of this stand-in")
        images = images if isinstance(images, list) else [images]
        pixels = [
            np.concatenate([self._one_tower(im.convert("RGB"), i) for i in range(len(self.input_sizes))])
            for im in images
        ]
        return BatchFeature(data={"pixel_values": np.stack(pixels)}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)


class PrismaticProcessor(ProcessorMixin):
    attributes: ClassVar[list] = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)

    def __call__(self, text, images, return_tensors=None):
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(text, return_tensors=return_tensors)
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})
